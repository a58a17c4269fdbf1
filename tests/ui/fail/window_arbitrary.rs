use attention::attention;

#[attention(self, heads = 8, mask = arbitrary, window = (128, 0))]
pub struct Layer;

fn main() {}
