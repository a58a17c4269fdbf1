use attention::attention;

#[attention(self, heads = 8, gqa = 2, heads = 16)]
pub struct Layer;

fn main() {}
