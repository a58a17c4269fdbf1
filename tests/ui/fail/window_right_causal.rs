use attention::attention;

#[attention(self, heads = 8, mask = causal, window = (128, 4))]
pub struct Layer;

fn main() {}
