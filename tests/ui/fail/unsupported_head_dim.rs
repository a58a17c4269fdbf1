use attention::attention;

#[attention(self, heads = 8, head_dim = [64, 72])]
pub struct Layer;

fn main() {}
