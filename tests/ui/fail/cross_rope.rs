use attention::attention;

#[attention(cross, heads = 8, head_dim = 64, rope = half)]
pub struct Layer;

fn main() {}
