use attention::attention;

#[attention(self, heads = 8, head_dim = 64)]
pub struct Layer {
    weights: Vec<f32>,
}

fn main() {}
