use attention::attention;

#[attention(self, heads = 8, qk_layernorm = rms, eps = -1)]
pub struct Layer;

fn main() {}
