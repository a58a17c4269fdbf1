use attention::attention;

#[attention(self, heads = "x")]
pub struct Layer;

fn main() {}
