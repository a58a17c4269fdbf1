//! Code generation: from a validated spec to the struct, its constants and its impls.
//!
//! Generated code names only `::attention::...` paths (the root package re-exports the
//! codegen and runtime crates), so a user depends on one crate.

use attention_codegen::grammar::RawSpec;
use attention_codegen::{
    AttentionKind, AttentionSpec, DType, MaskType, QkNorm, Role, RopeMode, Sinks, SpecError,
};
use proc_macro2::{Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned as _;

use crate::parse::{parse_tokens, SpanTable};

/// The macro's entry point on `proc_macro2` tokens.
pub fn attention(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item: syn::ItemStruct = match syn::parse2(item.clone()) {
        Ok(s) => s,
        Err(_) => {
            let span = match syn::parse2::<syn::Item>(item.clone()) {
                Ok(syn::Item::Enum(e)) => e.enum_token.span,
                Ok(syn::Item::Union(u)) => u.union_token.span,
                Ok(syn::Item::Fn(f)) => f.sig.fn_token.span,
                Ok(syn::Item::Impl(i)) => i.impl_token.span,
                Ok(syn::Item::Trait(t)) => t.trait_token.span,
                _ => Span::call_site(),
            };
            let err = syn::Error::new(
                span,
                "#[attention(...)] applies to a struct: write `struct Name;` and the macro \
                 generates its fields",
            );
            let mut out = err.to_compile_error();
            out.extend(item);
            return out;
        }
    };
    let mut errors: Vec<syn::Error> = check_struct(&item);
    let (table, raw) = parse_tokens(attr);
    let spec = match raw {
        Ok(raw) => match attention_codegen::validate::validate_all(&raw) {
            Ok(spec) => Some((raw, spec)),
            Err(errs) => {
                errors.extend(errs.iter().map(|e| spec_error(&table, e)));
                None
            }
        },
        Err(e) => {
            errors.push(spec_error(&table, &e));
            None
        }
    };
    if let (true, Some((raw, spec))) = (errors.is_empty(), &spec) {
        match expand(&item, raw, spec, &table) {
            Ok(ts) => return ts,
            Err(e) => errors.push(e),
        }
    }
    let mut out = TokenStream::new();
    for e in errors {
        out.extend(e.to_compile_error());
    }
    out.extend(fallback(&item));
    out
}

fn spec_error(table: &SpanTable, e: &SpecError) -> syn::Error {
    table.error(e.span, &e.kind)
}

/// The generated struct owns its fields: the user writes a unit struct (or `{}`) without
/// generics.
fn check_struct(item: &syn::ItemStruct) -> Vec<syn::Error> {
    let mut errors = Vec::new();
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &item.generics,
            "#[attention(...)] structs cannot be generic: the spec fixes every submodule type",
        ));
    }
    let has_fields = match &item.fields {
        syn::Fields::Unit => false,
        syn::Fields::Named(f) => !f.named.is_empty(),
        syn::Fields::Unnamed(_) => true,
    };
    if has_fields {
        errors.push(syn::Error::new(
            item.fields.span(),
            "#[attention(...)] generates the struct's fields (linear_qkv, core_attention, ...): \
             declare it without fields, as `struct Name;`",
        ));
    }
    errors
}

/// What the macro emits next to a spec error: the struct as written and every associated
/// item a generated layer has, with the same signatures, so the spec error is the only error
/// the user sees. The bodies are never run: the crate does not compile while the error stands.
fn fallback(item: &syn::ItemStruct) -> TokenStream {
    let rt = quote!(::attention::runtime);
    let name = &item.ident;
    let (ig, tg, wc) = item.generics.split_for_impl();
    let stub = quote!(::core::unreachable!(
        "the #[attention(...)] spec of this struct has an error"
    ));
    quote! {
        #item
        #[allow(dead_code, unused_variables, clippy::all)]
        impl #ig #name #tg #wc {
            /// The canonical spec (empty: the spec has an error).
            pub const SPEC: &'static str = "";
            /// The rendered kernels (empty: the spec has an error).
            pub const KERNELS: &'static [::attention::codegen::render::StaticKernel] = &[];
            /// Unavailable: the spec has an error.
            pub fn spec() -> ::attention::codegen::AttentionSpec { #stub }
            /// Unavailable: the spec has an error.
            pub fn config_for(dims: &#rt::config::RuntimeDims) -> #rt::Result<#rt::config::LayerConfig> { #stub }
            /// Unavailable: the spec has an error.
            pub fn new(dims: #rt::config::RuntimeDims, seed: u64) -> #rt::Result<Self> { #stub }
            /// Unavailable: the spec has an error.
            pub fn from_config(config: #rt::config::LayerConfig, seed: u64) -> #rt::Result<Self> { #stub }
            /// Unavailable: the spec has an error.
            pub fn from_weights(
                weights: &#rt::weights::WeightStore,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
            ) -> #rt::Result<Self> { #stub }
            /// Unavailable: the spec has an error.
            pub fn from_safetensors(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
            ) -> #rt::Result<Self> { #stub }
            /// Unavailable: the spec has an error.
            pub fn from_weights_named(
                weights: &#rt::weights::WeightStore,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
                names: #rt::weights::names::WeightNames,
            ) -> #rt::Result<Self> { #stub }
            /// Unavailable: the spec has an error.
            pub fn from_safetensors_named(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
                names: #rt::weights::names::WeightNames,
            ) -> #rt::Result<Self> { #stub }
            /// Unavailable: the spec has an error.
            pub fn state_dict_named(
                &self,
                prefix: &str,
                names: #rt::weights::names::WeightNames,
            ) -> #rt::Result<::std::vec::Vec<(::std::string::String, #rt::Tensor)>> { #stub }
            /// Unavailable: the spec has an error.
            pub fn forward(
                &self,
                hidden: &#rt::Tensor,
                args: &#rt::layer::ForwardArgs<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> { #stub }
            /// Unavailable: the spec has an error.
            pub fn prefill(
                &self,
                hidden: &#rt::Tensor,
                cache: &mut #rt::kv_cache::StaticKvCache,
                layer: usize,
                batch_offset: usize,
                args: &#rt::layer::ForwardArgs<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> { #stub }
            /// Unavailable: the spec has an error.
            pub fn decode(
                &self,
                hidden: &#rt::Tensor,
                cache: &mut #rt::kv_cache::StaticKvCache,
                layer: usize,
                batch_offset: usize,
                args: &#rt::layer::ForwardArgs<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> { #stub }
            /// Unavailable: the spec has an error.
            pub fn forward_paged(
                &self,
                hidden: &#rt::Tensor,
                cache: &mut #rt::kv_cache::PagedKvCache,
                layer: usize,
                batch: &#rt::kv_cache::PagedBatch<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> { #stub }
            /// Unavailable: the spec has an error.
            pub fn state_dict(&self, prefix: &str) -> ::std::vec::Vec<(::std::string::String, #rt::Tensor)> { #stub }
            /// Unavailable: the spec has an error.
            pub fn clip_qk(
                &mut self,
                record: &mut #rt::train::QkClip,
                threshold: f32,
                alpha: f32,
            ) -> #rt::Result<#rt::train::QkClipReport> { #stub }
        }
        #[allow(unused_variables, clippy::all)]
        impl #ig #rt::layer::AttentionLayer for #name #tg #wc {
            fn config(&self) -> &#rt::config::LayerConfig { #stub }
            fn parts(&self) -> #rt::layer::LayerParts<'_> { #stub }
        }
    }
}

/// Set every span in `ts` to `span` (so trait-bound errors on a user type point at the spec
/// token that named it).
fn respan(ts: TokenStream, span: Span) -> TokenStream {
    ts.into_iter()
        .map(|tt| match tt {
            TokenTree::Group(g) => {
                let mut ng = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                ng.set_span(span);
                TokenTree::Group(ng)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
}

/// A float as a Rust expression of type `f64` (exact: `Display` round-trips).
fn f64_tokens(x: f64) -> TokenStream {
    let lit = Literal::f64_suffixed(x.abs());
    if x.is_sign_negative() {
        quote!(-#lit)
    } else {
        quote!(#lit)
    }
}

fn i64_tokens(x: i64) -> TokenStream {
    let lit = Literal::i64_suffixed(x.unsigned_abs() as i64);
    if x < 0 {
        if x == i64::MIN {
            return quote!(::core::primitive::i64::MIN);
        }
        quote!(-#lit)
    } else {
        quote!(#lit)
    }
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> TokenStream) -> TokenStream {
    match v {
        Some(v) => {
            let inner = f(v);
            quote!(::core::option::Option::Some(#inner))
        }
        None => quote!(::core::option::Option::None),
    }
}

fn role_tokens(r: Role) -> TokenStream {
    let v = match r {
        Role::LinearQkv => quote!(LinearQkv),
        Role::LinearQ => quote!(LinearQ),
        Role::LinearKv => quote!(LinearKv),
        Role::LinearProj => quote!(LinearProj),
        Role::CoreAttention => quote!(CoreAttention),
        Role::QLayernorm => quote!(QLayernorm),
        Role::KLayernorm => quote!(KLayernorm),
    };
    quote!(::attention::codegen::Role::#v)
}

fn mask_tokens(m: MaskType) -> TokenStream {
    let v = match m {
        MaskType::Padding => quote!(Padding),
        MaskType::Causal => quote!(Causal),
        MaskType::NoMask => quote!(NoMask),
        MaskType::PaddingCausal => quote!(PaddingCausal),
        MaskType::Arbitrary => quote!(Arbitrary),
        MaskType::CausalBottomRight => quote!(CausalBottomRight),
    };
    quote!(::attention::codegen::MaskType::#v)
}

/// `spec` as a Rust expression building an equal `AttentionSpec` (no parsing at run time).
fn spec_tokens(spec: &AttentionSpec) -> TokenStream {
    let cg = quote!(::attention::codegen);
    let kind = match spec.kind {
        AttentionKind::SelfAttention => quote!(#cg::AttentionKind::SelfAttention),
        AttentionKind::CrossAttention => quote!(#cg::AttentionKind::CrossAttention),
    };
    let usize_opt = |v: Option<usize>| opt(v, |v| Literal::usize_suffixed(v).into_token_stream());
    let heads = usize_opt(spec.heads);
    let gqa = usize_opt(spec.gqa);
    let hidden = usize_opt(spec.hidden);
    let head_dims = spec.head_dims.iter().map(|d| Literal::usize_suffixed(*d));
    let qk_norm = opt(spec.qk_norm, |n| match n {
        QkNorm::Layer => quote!(#cg::QkNorm::Layer),
        QkNorm::Rms => quote!(#cg::QkNorm::Rms),
        QkNorm::L2 => quote!(#cg::QkNorm::L2),
    });
    let eps = f64_tokens(spec.eps);
    let bias = spec.bias;
    let qkv_bias = spec.qkv_bias;
    let rope = opt(spec.rope, |r| {
        let mode = match r.mode {
            RopeMode::Half => quote!(#cg::RopeMode::Half),
            RopeMode::Interleaved => quote!(#cg::RopeMode::Interleaved),
        };
        let pct = f64_tokens(r.rotary_percent);
        let base = f64_tokens(r.rotary_base);
        quote!(#cg::Rope { mode: #mode, rotary_percent: #pct, rotary_base: #base })
    });
    let masks = spec.masks.iter().map(|m| mask_tokens(*m));
    let window = opt(spec.window, |w| {
        let (l, r) = (i64_tokens(w.left), i64_tokens(w.right));
        quote!(#cg::Window { left: #l, right: #r })
    });
    let softmax_scale = opt(spec.softmax_scale, f64_tokens);
    let sinks = opt(spec.sinks, |s| match s {
        Sinks::OffByOne => quote!(#cg::Sinks::OffByOne),
        Sinks::Learnable => quote!(#cg::Sinks::Learnable),
    });
    let output_gate = spec.output_gate;
    let dtype = match spec.dtype {
        DType::Bf16 => quote!(#cg::DType::Bf16),
        DType::F16 => quote!(#cg::DType::F16),
    };
    let overrides = spec.overrides.iter().map(|(r, p)| {
        let r = role_tokens(*r);
        quote!((#r, ::std::string::String::from(#p)))
    });
    quote! {
        #cg::AttentionSpec {
            kind: #kind,
            heads: #heads,
            gqa: #gqa,
            head_dims: ::std::vec![#(#head_dims),*],
            hidden: #hidden,
            qk_norm: #qk_norm,
            eps: #eps,
            bias: #bias,
            qkv_bias: #qkv_bias,
            rope: #rope,
            masks: ::std::vec![#(#masks),*],
            window: #window,
            softmax_scale: #softmax_scale,
            sinks: #sinks,
            output_gate: #output_gate,
            dtype: #dtype,
            overrides: ::std::vec![#(#overrides),*],
        }
    }
}

/// The `KERNELS` table: every kernel the spec needs on any device (the registry's
/// [`kernels_for_spec_head_dims`](attention_codegen::registry::kernels_for_spec_head_dims)
/// with `Target::AnyDevice`: fast and fallback forward kernels, prep, cache kernels), rendered
/// now.
fn kernels_tokens(spec: &AttentionSpec) -> Result<TokenStream, syn::Error> {
    use attention_codegen::registry::{kernels_for_spec_head_dims, Target};
    let entries = if spec.head_dims.is_empty() {
        Vec::new()
    } else {
        kernels_for_spec_head_dims(spec, Target::AnyDevice)
            .and_then(|cs| attention_codegen::render::render_all(&cs))
            .map_err(|e| {
                syn::Error::new(
                    Span::call_site(),
                    format!("rendering the spec's kernels failed: {e}"),
                )
            })?
    };
    let rows = entries.iter().map(|k| {
        let key = &k.key;
        let source = &k.source;
        quote!(::attention::codegen::render::StaticKernel { key: #key, source: #source })
    });
    Ok(quote!(&[#(#rows),*]))
}

/// One submodule field of the generated struct.
struct Field {
    role: Role,
    name: syn::Ident,
    ty: TokenStream,
    /// Span for the construction calls (the override's token, or the call site).
    span: Span,
    doc: String,
}

fn fields(
    spec: &AttentionSpec,
    raw: &RawSpec,
    table: &SpanTable,
) -> Result<Vec<Field>, syn::Error> {
    let rt = quote!(::attention::runtime::modules);
    let mut roles: Vec<(Role, TokenStream, &str)> = Vec::new();
    match spec.kind {
        AttentionKind::SelfAttention => {
            roles.push((
                Role::LinearQkv,
                quote!(#rt::Linear),
                "Fused q/k/v projection: weight `[(np + 2 ng) hn, h]` (plus `np hn` gate rows \
                 with `output_gate`), interleaved per group.",
            ));
            if spec.qk_norm.is_some() {
                roles.push((
                    Role::QLayernorm,
                    quote!(#rt::QkNormLayer),
                    "Query norm over the head dim, weight `[hn]`.",
                ));
                roles.push((
                    Role::KLayernorm,
                    quote!(#rt::QkNormLayer),
                    "Key norm over the head dim, weight `[hn]`.",
                ));
            }
        }
        AttentionKind::CrossAttention => {
            roles.push((
                Role::LinearQ,
                quote!(#rt::Linear),
                "Query projection: weight `[np hn, h]`.",
            ));
            roles.push((
                Role::LinearKv,
                quote!(#rt::Linear),
                "Key/value projection of the context: weight `[2 np hn, h]`, per head `[k | v]`.",
            ));
        }
    }
    roles.push((
        Role::CoreAttention,
        quote!(#rt::DotProductAttention),
        "Core attention: `softmax(q k^T * scale + bias + mask) v` per query head.",
    ));
    roles.push((
        Role::LinearProj,
        quote!(#rt::Linear),
        "Output projection: weight `[h, np hn]`, bias `[h]` (returned, not added).",
    ));

    roles
        .into_iter()
        .map(|(role, default_ty, doc)| {
            let name = format_ident!("{}", role.name());
            match spec.override_for(role) {
                Some(path) => {
                    let span = raw
                        .items
                        .iter()
                        .find(|i| i.key.value == role.name())
                        .and_then(|i| i.value.as_ref())
                        .map(|v| table.first(v.span))
                        .unwrap_or_else(Span::call_site);
                    let parsed: syn::Path = syn::parse_str(path).map_err(|e| {
                        syn::Error::new(
                            span,
                            format!(
                                "`{}` override `{path}` is not a type path: {e}",
                                role.name()
                            ),
                        )
                    })?;
                    Ok(Field {
                        role,
                        name,
                        ty: respan(parsed.to_token_stream(), span),
                        span,
                        doc: format!("{doc} User type `{path}`."),
                    })
                }
                None => Ok(Field {
                    role,
                    name,
                    ty: default_ty,
                    span: Span::call_site(),
                    doc: doc.to_string(),
                }),
            }
        })
        .collect()
}

fn expand(
    item: &syn::ItemStruct,
    raw: &RawSpec,
    spec: &AttentionSpec,
    table: &SpanTable,
) -> Result<TokenStream, syn::Error> {
    let rt = quote!(::attention::runtime);
    let name = &item.ident;
    let vis = &item.vis;
    let attrs = &item.attrs;
    let spec_str = spec.to_string();
    let spec_expr = spec_tokens(spec);
    let kernels = kernels_tokens(spec)?;
    let fields = fields(spec, raw, table)?;

    let field_defs = fields.iter().map(|f| {
        let (n, ty, doc) = (&f.name, &f.ty, &f.doc);
        quote!(#[doc = #doc] pub #n: #ty,)
    });
    let field_names: Vec<&syn::Ident> = fields.iter().map(|f| &f.name).collect();
    let inits = fields.iter().map(|f| {
        let (n, ty, role) = (&f.name, &f.ty, role_tokens(f.role));
        quote_spanned!(f.span=> let #n = <#ty as #rt::modules::Submodule>::init(&config, #role, seed)?;)
    });
    let loads = fields.iter().map(|f| {
        let (n, ty, role) = (&f.name, &f.ty, role_tokens(f.role));
        quote_spanned!(f.span=> let #n = <#ty as #rt::modules::Submodule>::load(&config, #role, weights, prefix)?;)
    });

    let is_self = spec.kind == AttentionKind::SelfAttention;
    // Each submodule borrowed as its role's trait object; the coercion carries the
    // override's span so a missing trait impl is reported at the type the user named.
    let part = |role: Role| -> TokenStream {
        let Some(f) = fields.iter().find(|f| f.role == role) else {
            return quote!(::core::option::Option::None);
        };
        let n = &f.name;
        let tr = match role {
            Role::QLayernorm | Role::KLayernorm => quote!(NormModule),
            Role::CoreAttention => quote!(CoreAttentionModule),
            _ => quote!(LinearModule),
        };
        let e = respan(quote!(&self.#n as &dyn #rt::modules::#tr), f.span);
        if matches!(role, Role::QLayernorm | Role::KLayernorm) {
            quote!(::core::option::Option::Some(#e))
        } else {
            e
        }
    };
    let (core, proj) = (part(Role::CoreAttention), part(Role::LinearProj));
    // `linear_qkv` mutably (QK-Clip), with the override's span as `part` does.
    let qkv_mut = match fields.iter().find(|f| f.role == Role::LinearQkv) {
        Some(f) => {
            let n = &f.name;
            let e = respan(
                quote!(&mut self.#n as &mut dyn #rt::modules::LinearModule),
                f.span,
            );
            quote! {
                fn linear_qkv_mut(&mut self) -> ::core::option::Option<&mut dyn #rt::modules::LinearModule> {
                    ::core::option::Option::Some(#e)
                }
            }
        }
        None => TokenStream::new(),
    };
    // QK-Clip with a caller's record (self-attention only: cross-attention has no
    // linear_qkv).
    let clip_method = if is_self {
        quote! {
            /// QK-Clip on this layer's `linear_qkv.weight` with a record the caller keeps
            /// (`attention::runtime::train::QkClip::clip_layer`: per key/value group whose max
            /// recorded logit `m_g` exceeds `threshold`, query rows times `eta^alpha` and key
            /// rows times `eta^(1 - alpha)`, `eta = threshold / m_g`), then resets the record.
            /// Training through [`Self::on_cpu`] or [`Self::to_cuda`] needs no record of the
            /// caller's: those layers keep their own and clip themselves
            /// (`TrainLayer::clip_qk`).
            ///
            /// # Errors
            /// `InvalidArgument` for a `threshold` not finite and positive or an `alpha`
            /// outside `[0, 1]`; `NoBackendImpl` when a user
            /// `linear_qkv` type does not hand out its weight (`LinearModule::weight_mut`).
            /// Nothing changes on error.
            pub fn clip_qk(
                &mut self,
                record: &mut #rt::train::QkClip,
                threshold: f32,
                alpha: f32,
            ) -> #rt::Result<#rt::train::QkClipReport> {
                record.clip_layer(self, threshold, alpha)
            }
        }
    } else {
        TokenStream::new()
    };
    let parts = if is_self {
        let (qkv, qn, kn) = (
            part(Role::LinearQkv),
            part(Role::QLayernorm),
            part(Role::KLayernorm),
        );
        quote! {
            #rt::layer::LayerParts::SelfAttention(#rt::layer::SelfAttentionParts {
                config: &self.config,
                linear_qkv: #qkv,
                q_layernorm: #qn,
                k_layernorm: #kn,
                core_attention: #core,
                linear_proj: #proj,
            })
        }
    } else {
        let (q, kv) = (part(Role::LinearQ), part(Role::LinearKv));
        quote! {
            #rt::layer::LayerParts::CrossAttention(#rt::layer::CrossAttentionParts {
                config: &self.config,
                linear_q: #q,
                linear_kv: #kv,
                core_attention: #core,
                linear_proj: #proj,
            })
        }
    };
    let cache_methods = if is_self {
        quote! {
            /// A static-cache step: `hidden` `[s, b, h]` for batch slots
            /// `batch_offset..batch_offset + b`; appends k/v to `layer` of the cache and attends
            /// over every cached key, bottom-right causal (see the runtime's
            /// `SelfAttentionParts::prefill`).
            ///
            /// # Errors
            /// Shape, capacity and argument errors; a failing call changes nothing in the cache.
            pub fn prefill(
                &self,
                hidden: &#rt::Tensor,
                cache: &mut #rt::kv_cache::StaticKvCache,
                layer: usize,
                batch_offset: usize,
                args: &#rt::layer::ForwardArgs<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> {
                <Self as #rt::layer::AttentionLayer>::prefill(self, hidden, cache, layer, batch_offset, args)
            }

            /// One decode step: [`Self::prefill`] with `hidden` `[1, b, h]`.
            ///
            /// # Errors
            /// As [`Self::prefill`].
            pub fn decode(
                &self,
                hidden: &#rt::Tensor,
                cache: &mut #rt::kv_cache::StaticKvCache,
                layer: usize,
                batch_offset: usize,
                args: &#rt::layer::ForwardArgs<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> {
                <Self as #rt::layer::AttentionLayer>::decode(self, hidden, cache, layer, batch_offset, args)
            }

            /// Mixed decode + prefill over a paged cache: `hidden` `[T, h]` packed by
            /// `batch.cu_seqlens_q` -> output `[T, h]`.
            ///
            /// # Errors
            /// Shape, block-table and capacity errors.
            pub fn forward_paged(
                &self,
                hidden: &#rt::Tensor,
                cache: &mut #rt::kv_cache::PagedKvCache,
                layer: usize,
                batch: &#rt::kv_cache::PagedBatch<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> {
                <Self as #rt::layer::AttentionLayer>::forward_paged(self, hidden, cache, layer, batch)
            }
        }
    } else {
        TokenStream::new()
    };

    let weights_doc = format!(
        "Load the weights from a store under Megatron-Core names `{{prefix}}{{submodule}}.{{param}}` \
         (submodules: {}; params `weight`, `bias`), `prefix` e.g. \
         `decoder.layers.0.self_attention.`.",
        fields.iter().map(|f| format!("`{}`", f.name)).collect::<Vec<_>>().join(", ")
    );
    let struct_doc = format!("Attention layer generated from `#[attention({spec_str})]`.");
    let kernels_doc = "Rendered kernel sources for every phase x head dim x mask this spec needs \
                       (empty when the spec leaves `head_dim` to the runtime config).";

    Ok(quote! {
        #(#attrs)*
        #[doc = #struct_doc]
        #vis struct #name {
            #(#field_defs)*
            /// The spec resolved against the runtime dims.
            pub config: #rt::config::LayerConfig,
        }

        impl #name {
            /// The canonical spec string; `parse_spec(SPEC)` gives [`Self::spec`].
            pub const SPEC: &'static str = #spec_str;
            #[doc = #kernels_doc]
            pub const KERNELS: &'static [::attention::codegen::render::StaticKernel] = #kernels;

            /// The validated spec.
            pub fn spec() -> ::attention::codegen::AttentionSpec {
                #spec_expr
            }

            /// Resolve the spec against runtime dims (which may supply what the spec left out).
            ///
            /// # Errors
            /// `ConfigMismatch` when a dim disagrees with the spec or is missing from both.
            pub fn config_for(dims: &#rt::config::RuntimeDims) -> #rt::Result<#rt::config::LayerConfig> {
                #rt::config::LayerConfig::new(&Self::spec(), dims)
            }

            /// A layer with freshly initialised weights (deterministic in `seed`).
            ///
            /// # Errors
            /// `ConfigMismatch` when `dims` disagree with the spec or leave a dim unset.
            pub fn new(dims: #rt::config::RuntimeDims, seed: u64) -> #rt::Result<Self> {
                Self::from_config(Self::config_for(&dims)?, seed)
            }

            /// A layer with freshly initialised weights for an already resolved config, which
            /// must come from this layer's spec.
            ///
            /// # Errors
            /// `ConfigMismatch` when `config.spec` is not this layer's spec.
            pub fn from_config(config: #rt::config::LayerConfig, seed: u64) -> #rt::Result<Self> {
                Self::check_config(&config)?;
                #(#inits)*
                ::core::result::Result::Ok(Self { #(#field_names,)* config })
            }

            #[doc = #weights_doc]
            ///
            /// # Errors
            /// `MissingWeight`/`WeightShape` naming the key; `ConfigMismatch` for bad dims.
            pub fn from_weights(
                weights: &#rt::weights::WeightStore,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
            ) -> #rt::Result<Self> {
                Self::from_weights_named(weights, prefix, dims, #rt::weights::names::WeightNames::Megatron)
            }

            /// Load the weights from a store named as `names` says: Megatron-Core names as
            /// [`Self::from_weights`] reads them, or Hugging Face names (Llama/Mistral/Qwen2/Qwen3,
            /// GPT-2, BERT; `WeightNames::Hf` detects the family) under `prefix`, the attention
            /// module's (`model.layers.0.self_attn.`) or, when detecting, the block's
            /// (`model.layers.0.`), mapped into this layer's own layout (separate q/k/v fused
            /// per group; self-attention only). `attention_runtime::weights::hf::detect`
            /// reports which family a store holds.
            ///
            /// # Errors
            /// Those of [`Self::from_weights`]; for Hugging Face names `HfMissingWeight`,
            /// `HfExtraWeight`, `HfWeightShape` naming the key and the family,
            /// `HfFamilyNotFound`, and `InvalidArgument` for a spec the family cannot express.
            pub fn from_weights_named(
                weights: &#rt::weights::WeightStore,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
                names: #rt::weights::names::WeightNames,
            ) -> #rt::Result<Self> {
                let config = Self::config_for(&dims)?;
                let view = #rt::weights::names::megatron_view(
                    weights,
                    prefix.unwrap_or(""),
                    names,
                    &config,
                )?;
                let (weights, prefix) = (view.store(), view.prefix());
                #(#loads)*
                ::core::result::Result::Ok(Self { #(#field_names,)* config })
            }

            /// Load the weights from a safetensors file named as `names` says; see
            /// [`Self::from_weights_named`].
            ///
            /// # Errors
            /// I/O and safetensors errors naming the path, and those of
            /// [`Self::from_weights_named`].
            pub fn from_safetensors_named(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
                names: #rt::weights::names::WeightNames,
            ) -> #rt::Result<Self> {
                let weights = #rt::weights::WeightStore::from_file(path)?;
                Self::from_weights_named(&weights, prefix, dims, names)
            }

            /// Load the weights from a safetensors file; see [`Self::from_weights`].
            ///
            /// # Errors
            /// I/O and safetensors errors naming the path, and those of [`Self::from_weights`].
            pub fn from_safetensors(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
            ) -> #rt::Result<Self> {
                let weights = #rt::weights::WeightStore::from_file(path)?;
                Self::from_weights(&weights, prefix, dims)
            }

            fn check_config(config: &#rt::config::LayerConfig) -> #rt::Result<()> {
                let spec = Self::spec();
                if config.spec != spec {
                    return ::core::result::Result::Err(#rt::AttnError::ConfigMismatch {
                        field: ::std::string::String::from("spec"),
                        spec: ::std::string::String::from(Self::SPEC),
                        config: config.spec.to_string(),
                    });
                }
                ::core::result::Result::Ok(())
            }

            /// Forward: `hidden` `[s, b, h]` (or `[t, h]` packed) -> `output` of the same shape
            /// and `linear_proj`'s bias `[h]`, not added.
            ///
            /// # Errors
            /// Shape, mask and `cu_seqlens` errors naming the argument.
            pub fn forward(
                &self,
                hidden: &#rt::Tensor,
                args: &#rt::layer::ForwardArgs<'_>,
            ) -> #rt::Result<#rt::layer::LayerOutput> {
                <Self as #rt::layer::AttentionLayer>::forward(self, hidden, args)
            }

            #cache_methods

            /// Every parameter under its Megatron name, prefixed with `prefix`.
            pub fn state_dict(&self, prefix: &str) -> ::std::vec::Vec<(::std::string::String, #rt::Tensor)> {
                <Self as #rt::layer::AttentionLayer>::state_dict(self, prefix)
            }

            #clip_method

            /// This layer on the CPU reference backend, for code written over
            /// `attention::runtime::backend::BackendLayer` (the same calls run on a GPU with
            /// [`Self::to_cuda`]).
            pub fn on_cpu(self) -> #rt::backend::CpuLayer<Self> {
                #rt::backend::CpuLayer::new(self)
            }

            /// A copy of this layer on a CUDA GPU (its parameters in the spec's dtype), with the
            /// same calls through `attention::runtime::backend::BackendLayer` on device tensors.
            ///
            /// # Errors
            /// `NoBackendImpl` when a user submodule has no CUDA implementation (it must
            /// implement `attention::runtime::modules::CudaSubmodule`); those of
            /// `CudaLayer::new` (head dim, device memory, kernels).
            pub fn to_cuda(
                &self,
                device: &#rt::device::CudaDevice,
            ) -> #rt::Result<#rt::cuda::CudaLayer> {
                #rt::cuda::CudaLayer::new(self, device)
            }

            /// Load the weights from a safetensors file straight onto a CUDA GPU:
            /// [`Self::from_safetensors`] then [`Self::to_cuda`].
            ///
            /// # Errors
            /// Those of both.
            pub fn cuda_from_safetensors(
                path: impl ::core::convert::AsRef<::std::path::Path>,
                prefix: ::core::option::Option<&str>,
                dims: #rt::config::RuntimeDims,
                device: &#rt::device::CudaDevice,
            ) -> #rt::Result<#rt::cuda::CudaLayer> {
                Self::from_safetensors(path, prefix, dims)?.to_cuda(device)
            }

            /// Every parameter under `names` with `prefix`: Megatron names (as
            /// [`Self::state_dict`]) or a Hugging Face family's (`WeightNames::HfFamily`,
            /// `prefix` the attention module's), loadable by [`Self::from_weights_named`].
            ///
            /// # Errors
            /// `InvalidArgument` for `WeightNames::Hf` (saving needs a family), a spec the
            /// family cannot express, or a parameter it has no name for.
            pub fn state_dict_named(
                &self,
                prefix: &str,
                names: #rt::weights::names::WeightNames,
            ) -> #rt::Result<::std::vec::Vec<(::std::string::String, #rt::Tensor)>> {
                #rt::weights::names::state_dict_as(self, prefix, names)
            }
        }

        impl #rt::layer::AttentionLayer for #name {
            fn config(&self) -> &#rt::config::LayerConfig {
                &self.config
            }
            fn parts(&self) -> #rt::layer::LayerParts<'_> {
                #parts
            }
            #qkv_mut
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        attention(
            attr.parse().expect("attr tokens"),
            item.parse().expect("item tokens"),
        )
        .to_string()
    }

    #[test]
    fn a_valid_spec_generates_fields_constants_and_impls() {
        let out = expand_str(
            "self, heads = 2, gqa = 1, head_dim = 64, qk_layernorm = rms, window = (-1, 0), \
             linear_proj = my::Proj",
            "pub struct L;",
        );
        let file: syn::File = syn::parse_str(&out).expect("the expansion parses as Rust");
        let s = file.items.iter().find_map(|i| match i {
            syn::Item::Struct(s) => Some(s),
            _ => None,
        });
        let names: Vec<String> = s
            .expect("a struct")
            .fields
            .iter()
            .map(|f| f.ident.as_ref().expect("named").to_string())
            .collect();
        assert_eq!(
            names,
            [
                "linear_qkv",
                "q_layernorm",
                "k_layernorm",
                "core_attention",
                "linear_proj",
                "config"
            ]
        );
        assert!(out.contains("pub const SPEC"));
        assert!(out.contains("AttentionLayer for L"));
        assert!(out.contains("fn linear_qkv_mut") && out.contains("pub fn clip_qk"));
        assert!(out.contains("my :: Proj"));
        assert!(out.contains("left : - 1i64"));
        assert!(!out.contains("compile_error"));
    }

    #[test]
    fn cross_attention_has_its_own_fields_and_no_cache_methods() {
        let out = expand_str("cross, heads = 2", "struct C;");
        assert!(out.contains("linear_q :") && out.contains("linear_kv :"));
        assert!(!out.contains("linear_qkv") && !out.contains("fn prefill"));
        assert!(!out.contains("fn clip_qk"));
    }

    #[test]
    fn an_error_gives_one_compile_error_and_the_fallback() {
        let out = expand_str("self, heads = 8, head = 64", "pub struct L;");
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(out.contains("did you mean `heads`"));
        assert!(out.contains("pub struct L ;"));
        assert!(out.contains("pub fn new"));
        // Independent mistakes are each reported once.
        let out = expand_str("self, heads = 8, head = 64, mask = casual", "pub struct L;");
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
    }

    #[test]
    fn floats_and_negative_ints_are_exact_literals() {
        assert_eq!(f64_tokens(1e-6).to_string(), "0.000001f64");
        assert_eq!(f64_tokens(-0.5).to_string(), "- 0.5f64");
        assert_eq!(i64_tokens(-1).to_string(), "- 1i64");
        assert_eq!(i64_tokens(4096).to_string(), "4096i64");
    }
}
