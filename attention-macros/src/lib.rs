//! The `#[attention(...)]` attribute macro.
//!
//! Three stages, each in its own module:
//! - `parse`: the attribute's tokens become an [`attention_codegen::RawSpec`] whose spans
//!   index a table of token spans;
//! - validation: `attention_codegen::validate::validate_all` checks every rule (the same code
//!   the string front end uses), and each error is reported at its token;
//! - `expand`: the struct, its constants, constructors and the runtime's layer trait.
//!
//! On an error the macro still emits the struct as written plus a minimal impl, so a user
//! sees the spec error and not a cascade of "no field"/"no function" errors.

use proc_macro::TokenStream;

mod expand;
mod parse;

/// Generate an attention layer from a spec. See the root crate (`attention`) for the grammar
/// and the generated items.
#[proc_macro_attribute]
pub fn attention(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::attention(attr.into(), item.into()).into()
}
