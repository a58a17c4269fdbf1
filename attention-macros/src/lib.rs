//! The `#[attention(...)]` attribute macro.
use proc_macro::TokenStream;

/// Generate an attention layer from a spec. See the root crate's docs.
#[proc_macro_attribute]
pub fn attention(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
