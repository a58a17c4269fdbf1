use attention::attention;

#[attention(self, heads = 12, gqa = 5, head_dim = 64)]
pub struct Layer;

fn main() {}
