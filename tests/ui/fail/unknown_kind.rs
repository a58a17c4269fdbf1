use attention::attention;

#[attention(selff, heads = 8)]
pub struct Layer;

fn main() {}
