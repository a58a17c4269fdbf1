use attention::attention;

#[attention(self, heads = 8, q_layernorm = my::Norm)]
pub struct Layer;

fn main() {}
