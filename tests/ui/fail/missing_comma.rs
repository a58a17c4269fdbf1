use attention::attention;

#[attention(self, heads = 8 gqa = 2)]
pub struct Layer;

fn main() {}
