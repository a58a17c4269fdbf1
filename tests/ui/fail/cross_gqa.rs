use attention::attention;

#[attention(cross, heads = 8, gqa = 2, head_dim = 64)]
pub struct Layer;

fn main() {}
