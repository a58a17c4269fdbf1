use attention::attention;

#[attention(self, heads = 8, rope = full)]
pub struct Layer;

fn main() {}
