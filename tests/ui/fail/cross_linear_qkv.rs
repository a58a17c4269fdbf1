use attention::attention;

#[attention(cross, heads = 8, linear_qkv = my::Qkv)]
pub struct Layer;

fn main() {}
