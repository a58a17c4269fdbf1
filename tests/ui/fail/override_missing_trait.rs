use attention::attention;

/// Not a linear module: implements neither `LinearModule` nor `Submodule`.
pub struct NotALinear;

#[attention(self, heads = 2, head_dim = 64, linear_proj = NotALinear)]
pub struct Layer;

fn main() {}
