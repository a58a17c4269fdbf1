use attention::attention;

#[attention(self, heads = 8, head_dim = 64)]
pub enum Layer {
    A,
}

fn main() {}
