use attention::attention;

#[attention(self, heads = 8, linear_kv = my::Kv)]
pub struct Layer;

fn main() {}
