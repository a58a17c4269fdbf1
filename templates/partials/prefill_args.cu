// ---------------------------------------------------------------------------------------
// The tensor-core prefill kernels' (prefill_sm80.cu, prefill_sm90.cu) positional parameters,
// the fields of `FwdParams` (partials/params.cu) in its order, then the opening of the body
// with the casts of the mask-tensor and bias arguments the variant ignores. Included right
// after the kernel's `{{ key }}(`. With `tma` (prefill_sm90.cu's warp-specialized tile), a
// `TmaMaps` parameter follows the fields (`FwdTmaParams` on the host).
// ---------------------------------------------------------------------------------------
    const elem_t* __restrict__ q,
    const elem_t* __restrict__ k,
    const elem_t* __restrict__ v,
    elem_t* __restrict__ out,
    float* __restrict__ lse,
    const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ cu_seqlens_k,
    int batch,
    int num_heads,
    int num_groups,
    int seqlen_q,
    int seqlen_k,
    float softmax_scale,
    int window_left,
    int window_right,
    const unsigned char* __restrict__ mask,
    long long mask_stride_b,
    long long mask_stride_h,
    long long mask_stride_q,
    long long mask_stride_k,
    const float* __restrict__ bias,
    long long bias_stride_b,
    long long bias_stride_h,
    long long bias_stride_q,
    long long bias_stride_k,
    const float* __restrict__ sinks,
    const elem_t* __restrict__ gate,
    float* __restrict__ max_logit,
    const int* __restrict__ v_nonfinite,
    const int* __restrict__ cache_seqlens_k,
    int cache_batch_offset,
    int cache_max_batch,
    const int* __restrict__ block_table,
    int block_size,
    int max_blocks_per_seq{% if tma | default(value=false) %},
    // After FwdParams' fields: the TMA tensor maps (prefill_sm90.cu's warp-specialized tile).
    // NVRTC places this 64-byte-aligned struct at byte 240 of the parameter buffer, 64-byte
    // aligned in the constant bank where sm_90's parameters start (0x210): the host's
    // `FwdTmaParams`, held to it by tests/nvrtc_catalog.rs.
    const __grid_constant__ TmaMaps tma_maps{% endif %})
{
{%- if not mask_tensor %}
    (void)mask; (void)mask_stride_b; (void)mask_stride_h; (void)mask_stride_q; (void)mask_stride_k;
{%- endif %}
{%- if not has_bias %}
    (void)bias; (void)bias_stride_b; (void)bias_stride_h; (void)bias_stride_q; (void)bias_stride_k;
{%- endif %}
