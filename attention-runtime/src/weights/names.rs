//! [`WeightNames`]: which naming convention a weights file uses, and the two conversions the
//! loaders and savers need (a store under Megatron names for [`crate::modules::Submodule::load`],
//! a state dict under the chosen names).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::layer::AttentionLayer;
use crate::tensor::Tensor;
use crate::weights::hf::{self, HfFamily, HfLayout};
use crate::weights::WeightStore;

/// How the tensors of one attention layer are named in a weights file.
///
/// Parses from (and prints as) `megatron`, `hf`, `hf:llama`, `hf:gpt2`, `hf:bert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightNames {
    /// Megatron-Core's names, `{prefix}linear_qkv.weight` ... (the layer's own layout).
    #[default]
    Megatron,
    /// Hugging Face names; the family is detected from the keys under the prefix
    /// ([`hf::detect`]) and reported ([`MegatronWeights::hf_layout`]). Loading only: saving
    /// needs a family.
    Hf,
    /// Hugging Face names of this family.
    HfFamily(HfFamily),
}

impl fmt::Display for WeightNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightNames::Megatron => f.write_str("megatron"),
            WeightNames::Hf => f.write_str("hf"),
            WeightNames::HfFamily(fam) => write!(f, "hf:{}", fam.name()),
        }
    }
}

impl FromStr for WeightNames {
    type Err = AttnError;
    /// `megatron`, `hf` (detect the family) or `hf:FAMILY` (see [`HfFamily`]'s `FromStr`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "megatron" => Ok(WeightNames::Megatron),
            "hf" => Ok(WeightNames::Hf),
            _ => match s.strip_prefix("hf:") {
                Some(fam) => Ok(WeightNames::HfFamily(fam.parse()?)),
                None => Err(AttnError::InvalidArgument {
                    arg: "names".into(),
                    expected: "megatron, hf, hf:llama, hf:gpt2 or hf:bert".into(),
                    got: s.into(),
                }),
            },
        }
    }
}

/// A layer's weights under Megatron names: the store given (Megatron names) or one converted
/// from Hugging Face names, with the prefix to load them from.
#[derive(Debug, Clone)]
pub struct MegatronWeights<'a> {
    store: Cow<'a, WeightStore>,
    prefix: String,
    hf: Option<HfLayout>,
}

impl MegatronWeights<'_> {
    /// The store to pass to [`crate::modules::Submodule::load`].
    pub fn store(&self) -> &WeightStore {
        &self.store
    }
    /// The prefix to pass with it (the one given for Megatron names, empty after a conversion).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The Hugging Face family and attention-module prefix the weights came from, if any.
    pub fn hf_layout(&self) -> Option<&HfLayout> {
        self.hf.as_ref()
    }
}

/// `weights` under Megatron names for a layer of `cfg`: borrowed as they are for
/// [`WeightNames::Megatron`], converted ([`hf::to_megatron`]) for the Hugging Face names,
/// `prefix` being the attention module's (or, for [`WeightNames::Hf`], the block's).
///
/// Errors: those of [`hf::detect`], [`hf::layout_of`] and [`hf::to_megatron`], each naming the
/// key and the family. Megatron names are checked later, by the loader.
pub fn megatron_view<'a>(
    weights: &'a WeightStore,
    prefix: &str,
    names: WeightNames,
    cfg: &LayerConfig,
) -> Result<MegatronWeights<'a>> {
    let layout = match names {
        WeightNames::Megatron => {
            return Ok(MegatronWeights {
                store: Cow::Borrowed(weights),
                prefix: prefix.into(),
                hf: None,
            })
        }
        WeightNames::Hf => hf::detect(weights, prefix)?,
        WeightNames::HfFamily(f) => hf::layout_of(weights, prefix, f)?,
    };
    let store = hf::to_megatron(weights, &layout, cfg)?;
    Ok(MegatronWeights {
        store: Cow::Owned(store),
        prefix: String::new(),
        hf: Some(layout),
    })
}

/// Every parameter of `layer` under `names` with `prefix`: Megatron names as
/// [`AttentionLayer::state_dict`] gives them, or a Hugging Face family's ([`hf::from_megatron`],
/// `prefix` then being the attention module's, e.g. `model.layers.0.self_attn.`).
///
/// Errors: [`AttnError::InvalidArgument`] (`names`) for [`WeightNames::Hf`] (saving needs a
/// family), and those of [`hf::from_megatron`].
pub fn state_dict_as<L: AttentionLayer + ?Sized>(
    layer: &L,
    prefix: &str,
    names: WeightNames,
) -> Result<Vec<(String, Tensor)>> {
    match names {
        WeightNames::Megatron => Ok(layer.state_dict(prefix)),
        WeightNames::Hf => Err(AttnError::InvalidArgument {
            arg: "names".into(),
            expected: "megatron or a family (hf:llama, hf:gpt2, hf:bert) to save under".into(),
            got: "hf (detection works only when loading)".into(),
        }),
        WeightNames::HfFamily(f) => {
            hf::from_megatron(&layer.state_dict(""), layer.config(), f, prefix)
        }
    }
}
