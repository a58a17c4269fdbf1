use attention::attention;
use attention::runtime::layer::{AttentionLayer, ForwardArgs};
use attention::runtime::{RuntimeDims, Tensor};

// The spec has one mistake. The fallback item keeps every use of the generated items
// type-checking, so the user sees exactly one error (the spec's), not a cascade.
#[attention(self, heads = 8, head_dim = 64, qk_layernorm = rmsnorm)]
pub struct Layer;

fn main() {
    let _spec: &str = Layer::SPEC;
    let _kernels = Layer::KERNELS.len();
    let layer = Layer::new(RuntimeDims::default(), 0).unwrap();
    let x = Tensor::zeros(&[1, 1, 512]);
    let _out = layer.forward(&x, &ForwardArgs::default()).unwrap();
    let _dynamic: &dyn AttentionLayer = &layer;
    let _heads = layer.config().heads;
    let _back = Layer::from_safetensors("w.safetensors", Some("p."), RuntimeDims::default());
}
