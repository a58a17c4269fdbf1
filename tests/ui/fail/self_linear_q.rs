use attention::attention;

#[attention(self, heads = 8, linear_q = my::Q)]
pub struct Layer;

fn main() {}
