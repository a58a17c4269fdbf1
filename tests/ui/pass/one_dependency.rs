//! A user crate that depends only on `attention`: layers of both kinds, a user submodule, and
//! the generated items used through the root package's paths.

use attention::attention;
use attention::runtime::layer::{AttentionLayer, ForwardArgs};
use attention::runtime::{RuntimeDims, Tensor};

mod my {
    use attention::codegen::Role;
    use attention::runtime::modules::{Linear, LinearModule, Submodule};
    use attention::runtime::{LayerConfig, Result, Tensor, WeightStore};

    pub struct Proj(Linear);

    impl LinearModule for Proj {
        fn in_features(&self) -> usize {
            self.0.in_features()
        }
        fn out_features(&self) -> usize {
            self.0.out_features()
        }
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            self.0.forward(x)
        }
        fn bias(&self) -> Option<&Tensor> {
            self.0.bias()
        }
    }

    impl Submodule for Proj {
        fn init(cfg: &LayerConfig, role: Role, seed: u64) -> Result<Self> {
            Linear::init(cfg, role, seed).map(Proj)
        }
        fn load(cfg: &LayerConfig, role: Role, w: &WeightStore, prefix: &str) -> Result<Self> {
            Linear::load(cfg, role, w, prefix).map(Proj)
        }
    }
}

#[attention(self, heads = 2, gqa = 1, head_dim = 64, qk_layernorm = rms, rope, linear_proj = my::Proj)]
pub struct Decoder;

#[attention(cross, heads = 2, head_dim = 64, mask = padding)]
struct Encoder;

fn main() {
    let d = Decoder::new(RuntimeDims::default(), 0).unwrap();
    let x = Tensor::zeros(&[2, 1, 128]);
    let y = d.forward(&x, &ForwardArgs::default()).unwrap();
    assert_eq!(y.output.shape(), &[2, 1, 128]);
    let layers: Vec<Box<dyn AttentionLayer>> = vec![
        Box::new(d),
        Box::new(Encoder::new(RuntimeDims::default(), 1).unwrap()),
    ];
    assert_eq!(layers.len(), 2);
    assert!(!Decoder::KERNELS.is_empty() && !Encoder::SPEC.is_empty());
}
