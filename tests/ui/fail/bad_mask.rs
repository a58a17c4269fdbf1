use attention::attention;

#[attention(self, heads = 8, mask = [causal, casual])]
pub struct Layer;

fn main() {}
