// ---------------------------------------------------------------------------------------
// Shared by the tensor-core prefill kernels (prefill_sm80.cu, prefill_sm90.cu): the per-head
// max-logit record's atomic max, and (variants that can mask keys inside a tile) the exact
// one-warp-per-row path taken when `v_nonfinite` is set. Needs WARPS and, for exact_rows,
// partials/attend.cu.
// ---------------------------------------------------------------------------------------

/// Atomic max on a float (order-independent, so deterministic).
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
    if (v >= 0.0f) {
        atomicMax((int*)addr, __float_as_int(v));
    } else {
        atomicMin((unsigned int*)addr, __float_as_uint(v));
    }
}

{%- if may_mask %}
/// The block's rows computed exactly, one warp per row, never reading a masked key (the
/// path taken when `v_nonfinite` is set; see the header). Out of line, so the main loop's
/// registers stay as they are.
__device__ __noinline__ void exact_rows(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    elem_t* __restrict__ out, float* __restrict__ lse, long long q_tok0, long long q_step,
    long long k_tok0, long long k_step, long long total_q, int m0, int m_valid, int sq, int sk,
    int h, int grp, int b, int num_heads, int num_groups, float softmax_scale, int window_left,
    int window_right, const unsigned char* __restrict__ mask, long long mask_stride_b,
    long long mask_stride_h, long long mask_stride_q, long long mask_stride_k,
    const float* __restrict__ bias, long long bias_stride_b, long long bias_stride_h,
    long long bias_stride_q, long long bias_stride_k, const float* __restrict__ sinks,
    const elem_t* __restrict__ gate, float* __restrict__ max_logit)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
{%- if has_bias %}
    (void)LOG2E;  // logits come in log2 units from biased_logit_log2
{%- else %}
    const float scale_log2 = softmax_scale * LOG2E;
{%- endif %}
    float head_max = neg_inf();
    for (int r = warp; r < m_valid; r += WARPS) {
        const int i = m0 + r;
        const long long tok = q_tok0 + (long long)i * q_step;
        const long long q_off = (tok * num_heads + h) * HEAD_DIM;
        float qv[LANE_D];
        load_q(qv, q + q_off, lane);
        int lo, hi;
        visible_range(i, sq, sk, window_left, window_right, &lo, &hi);
        RowState st;
        row_init(st, sinks, h);
        for (int j = lo; j < hi; ++j) {
{%- if mask_tensor %}
            if (mask[(long long)b * mask_stride_b + (long long)h * mask_stride_h + (long long)i * mask_stride_q +
                     (long long)j * mask_stride_k] != 0)
                continue;
{%- endif %}
            const long long kv_off = ((k_tok0 + (long long)j * k_step) * num_groups + grp) * HEAD_DIM;
{%- if has_bias %}
            const float bj = bias[(long long)b * bias_stride_b + (long long)h * bias_stride_h +
                                  (long long)i * bias_stride_q + (long long)j * bias_stride_k];
            if (bj == neg_inf()) continue;
            const float s = biased_logit_log2(row_dot(qv, k + kv_off, lane) * softmax_scale, bj);
{%- else %}
            const float s = row_dot(qv, k + kv_off, lane) * scale_log2;
{%- endif %}
            head_max = fmaxf(head_max, s);
            row_update(st, s, v + kv_off, lane);
        }
        row_finish(st, out + q_off, gate + q_off, lse + (long long)h * total_q + tok, lane);
    }
    if (max_logit != nullptr && lane == 0 && head_max != neg_inf())
        atomic_max_float(max_logit + h, head_max * LN2);
{%- if not mask_tensor %}
    (void)mask; (void)mask_stride_b; (void)mask_stride_h; (void)mask_stride_q; (void)mask_stride_k;
{%- endif %}
{%- if not has_bias %}
    (void)bias; (void)bias_stride_b; (void)bias_stride_h; (void)bias_stride_q; (void)bias_stride_k;
{%- endif %}
}
{%- endif %}
