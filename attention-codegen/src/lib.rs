//! Attention spec model, grammar, validation, kernel rendering and the kernel catalog.
//!
//! This crate has no GPU dependencies: the proc macro, the runtime and the CLI all use it.
//!
//! - [`spec`]: the validated model ([`AttentionSpec`]).
//! - [`grammar`]: the shared grammar ([`RawSpec`]) and the string parser.
//! - [`mod@validate`]: the rules, each with its own error.
//! - [`render`]: tera rendering of the CUDA templates into kernel sources.
//! - [`registry`]: the one list of kernels a (spec, head dim, device) needs.
//! - [`catalog`]: the specs of real models rendered ahead of time into `kernels-generated/`.

pub mod catalog;
pub mod error;
pub mod grammar;
pub mod registry;
pub mod render;
pub mod spec;
pub mod validate;

pub use error::{SpecError, SpecErrorKind};
pub use grammar::{RawItem, RawSpec, RawValue, Span, Spanned};
pub use spec::*;
pub use validate::{parse_spec, validate, validate_all};
