use attention::attention;

#[attention(self, heads = 8, head = 64)]
pub struct Layer;

fn main() {}
