// ---------------------------------------------------------------------------------------
// The tensor-core prefill kernels' (prefill_sm80.cu, prefill_sm90.cu) block setup, inside the
// kernel body: the block's query rows, head, sequence (padded, packed, static or paged
// cache) and its row ranges; the `v_nonfinite` exact path (partials/prefill_common.cu); Q
// and K/V row strides and bases and the KV tiles [tile_lo, tile_hi) any row of the block
// can see (partials/q_block_tiles.cu); `s_mul`, the factor from S to log2-unit logits.
// Needs BLOCK_M, BLOCK_N and the kernel's parameters (partials/prefill_args.cu).
// ---------------------------------------------------------------------------------------
    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int grp = h / (num_heads / num_groups);
    const bool packed = cu_seqlens_q != nullptr;

    int sq, sk;
    long long q_tok0, k_tok0, q_step, k_step, total_q;
    if (packed) {
        const int q0 = cu_seqlens_q[b];
        sq = cu_seqlens_q[b + 1] - q0;
{%- if paged_kv %}
        // Paged cache: request b's keys 0 .. cache_seqlens_k[b] live in pool blocks
        // block_table[b, j / block_size], rows j % block_size (k_tok0/k_step unused).
        const int k0 = 0;
        sk = cache_seqlens_k[b];
{%- else %}
        const int k0 = cu_seqlens_k[b];
        sk = cu_seqlens_k[b + 1] - k0;
{%- endif %}
        q_tok0 = q0;
        k_tok0 = k0;
        q_step = 1;
        k_step = 1;
        total_q = cu_seqlens_q[batch];
    } else {
        sq = seqlen_q;
        sk = seqlen_k;
        q_tok0 = b;
        k_tok0 = b;
        q_step = batch;
        k_step = batch;
        total_q = (long long)seqlen_q * batch;
        if (cache_seqlens_k != nullptr) {
            // Static KV cache: sequence b is cache slot cache_batch_offset + b of a
            // [max_seq, cache_max_batch, num_groups, HEAD_DIM] layer with cache_seqlens_k[b] keys.
            sk = cache_seqlens_k[b];
            k_tok0 = (long long)cache_batch_offset + b;
            k_step = cache_max_batch;
        }
    }
    const int m0 = m_block * BLOCK_M;
    if (m0 >= sq) return;
    const int m_valid = min(BLOCK_M, sq - m0);
{%- if may_mask %}
    if (v_nonfinite != nullptr && *v_nonfinite != 0) {
        exact_rows(q, k, v, out, lse, q_tok0, q_step, k_tok0, k_step, total_q, m0, m_valid, sq, sk,
                   h, grp, b, num_heads, num_groups, softmax_scale, window_left, window_right, mask,
                   mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k, bias, bias_stride_b,
                   bias_stride_h, bias_stride_q, bias_stride_k, sinks, gate, max_logit);
        return;
    }
{%- else %}
    (void)v_nonfinite;  // no key is masked inside a tile: nothing to guard
{%- endif %}

{% include "partials/q_block_tiles.cu" %}

{%- if has_bias %}
    // With a bias, S holds finished logits in log2 units (biased_logit_log2: a finite bias
    // never overflows); without one, raw q.k with the scale folded into the exponent's FFMA.
    const float s_mul = 1.0f;
    (void)FAST_LOG2E;
{%- else %}
    const float s_mul = softmax_scale * FAST_LOG2E;
{%- endif %}
