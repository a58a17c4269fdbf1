// Kernel `{{ key }}`: attention forward (prefill/training), rendered from templates/prefill_rows.cu.
// dtype {{ dtype }}, head dim {{ head_dim }}, mask {{ mask }}, window {{ has_window }},
// sinks {{ sinks }}, bias {{ has_bias }}, output gate {{ has_gate }}, {{ block_rows }} query rows per block.
//
// Launch: grid (ceil(max_seqlen_q / {{ block_rows }}), num_heads, batch), block ({{ block_rows }} * 32).
// One warp per (query row, head, sequence). GQA by indexing: head h reads group
// h / (num_heads / num_groups); K/V are never repeated.
//
// Layouts (row-major, elements of elem_t unless stated):
//   padded (cu_seqlens_q == nullptr): q, out, gate [seqlen_q, batch, num_heads, HEAD_DIM];
//                                    k, v [seqlen_k, batch, num_groups, HEAD_DIM]
//   packed (cu_seqlens_q, cu_seqlens_k int32 [batch + 1], both given):
//                                    q, out, gate [total_q, num_heads, HEAD_DIM];
//                                    k, v [total_k, num_groups, HEAD_DIM]
//   lse: f32 [num_heads, rows], rows = seqlen_q * batch (padded, row = i * batch + b) or
//        total_q (packed, row = token index).
//   mask (padding/arbitrary masks): uint8, nonzero = masked out, element (b, h, i, j) at
//        b * mask_stride_b + h * mask_stride_h + i * mask_stride_q + j * mask_stride_k
//        (stride 0 broadcasts; i, j are positions within the sequence).
//   bias: f32 additive post-scale bias, element (b, h, i, j) at the same kind of strides.
//   sinks: f32 [num_heads] learned sink logits (learnable sinks only).
// Parameters: one `const FwdParams p` (partials/params.cu), fields q, k, v,
// out, lse, cu_seqlens_q, cu_seqlens_k, batch, num_heads, num_groups, seqlen_q, seqlen_k,
// softmax_scale, window_left, window_right, mask + strides, bias + strides, sinks, gate; the
// others (max_logit .. max_blocks_per_seq) are ignored, as are fields a variant does not use
// (null / 0).

{% include "partials/rows_kernel.cu" %}
    const elem_t* __restrict__ q = p.q;
    const elem_t* __restrict__ k = p.k;
    const elem_t* __restrict__ v = p.v;
    const int* __restrict__ cu_seqlens_q = p.cu_seqlens_q;
    const int* __restrict__ cu_seqlens_k = p.cu_seqlens_k;
    const int batch = p.batch, num_heads = p.num_heads, num_groups = p.num_groups;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int i = blockIdx.x * BLOCK_ROWS + warp;
    const int g = h / (num_heads / num_groups);
    const bool packed = cu_seqlens_q != nullptr;

    int sq, sk;
    long long q_tok, k_base, k_step, total_q;
    if (packed) {
        const int q0 = cu_seqlens_q[b];
        const int k0 = cu_seqlens_k[b];
        sq = cu_seqlens_q[b + 1] - q0;
        sk = cu_seqlens_k[b + 1] - k0;
        q_tok = (long long)q0 + i;
        k_base = k0;
        k_step = 1;
        total_q = cu_seqlens_q[batch];
    } else {
        sq = p.seqlen_q;
        sk = p.seqlen_k;
        q_tok = (long long)i * batch + b;
        k_base = b;
        k_step = batch;
        total_q = (long long)p.seqlen_q * batch;
    }
    if (i >= sq) return;

    const long long q_off = (q_tok * num_heads + h) * HEAD_DIM;
    float qv[LANE_D];
    load_q(qv, q + q_off, lane);

    int lo, hi;
    visible_range(i, sq, sk, p.window_left, p.window_right, &lo, &hi);
    const float scale_log2 = p.softmax_scale * LOG2E;

    RowState st;
    row_init(st, p.sinks, h);
    for (int j = lo; j < hi; ++j) {
{%- if mask_tensor %}
        if (p.mask[b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_q + j * p.mask_stride_k] != 0) continue;
{%- endif %}
        const long long kv_off = ((k_base + (long long)j * k_step) * num_groups + g) * HEAD_DIM;
{%- if has_bias %}
        // A -inf bias skips the key (row_update); a finite one stays finite (biased_logit_log2).
        const float bj = p.bias[b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_q + j * p.bias_stride_k];
        if (bj == neg_inf()) continue;
        const float s = biased_logit_log2(row_dot(qv, k + kv_off, lane) * p.softmax_scale, bj);
        (void)scale_log2;
{%- else %}
        const float s = row_dot(qv, k + kv_off, lane) * scale_log2;
{%- endif %}
        row_update(st, s, v + kv_off, lane);
    }
    row_finish(st, p.out + q_off, p.gate + q_off, p.lse + (long long)h * total_q + q_tok, lane);
}
