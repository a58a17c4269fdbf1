// Kernel `{{ key }}`: attention over a paged KV cache (mixed decode and prefill), rendered
// from templates/decode_rows_paged.cu. dtype {{ dtype }}, head dim {{ head_dim }}, causal {{ causal_mode }},
// window {{ has_window }}, sinks {{ sinks }}, output gate {{ has_gate }}, {{ block_rows }} query rows per block.
//
// Request b has cu_seqlens_q[b + 1] - cu_seqlens_q[b] new queries and attends to its
// seqlens_k[b] cached keys (the new ones included), bottom-right aligned. Key j of request b
// lives in pool block block_table[b, j / block_size], row j % block_size. All pool offsets
// are 64-bit.
//
// Launch: grid (ceil(max_seqlen_q / {{ block_rows }}), num_heads, batch), block ({{ block_rows }} * 32).
// Parameters: one `const FwdParams p` (partials/params.cu); read: q, k / v
// (the pools), out, lse, cu_seqlens_q, cache_seqlens_k (seqlens_k below), block_table,
// batch, num_heads, num_groups, block_size, max_blocks_per_seq, softmax_scale,
// window_left/right, sinks, gate.
//
// Layouts (row-major):
//   q, out, gate: elem_t [total_q, num_heads, HEAD_DIM] (packed)
//   k_pool, v_pool: elem_t [num_blocks, block_size, num_groups, HEAD_DIM]
//   cu_seqlens_q: int32 [batch + 1]; seqlens_k: int32 [batch]
//   block_table: int32 [batch, max_blocks_per_seq]
//   lse: f32 [num_heads, total_q], total_q = cu_seqlens_q[batch]
//   sinks: f32 [num_heads] (learnable sinks only)

{% include "partials/rows_kernel.cu" %}
    const elem_t* __restrict__ k_pool = p.k;
    const elem_t* __restrict__ v_pool = p.v;
    const int* __restrict__ cu_seqlens_q = p.cu_seqlens_q;
    const int batch = p.batch, num_heads = p.num_heads, num_groups = p.num_groups;
    const int block_size = p.block_size;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int i = blockIdx.x * BLOCK_ROWS + warp;
    const int g = h / (num_heads / num_groups);
    const int q0 = cu_seqlens_q[b];
    const int sq = cu_seqlens_q[b + 1] - q0;
    if (i >= sq) return;
    const int sk = p.cache_seqlens_k[b];
    const long long total_q = cu_seqlens_q[batch];

    const long long q_tok = (long long)q0 + i;
    const long long q_off = (q_tok * num_heads + h) * HEAD_DIM;
    float qv[LANE_D];
    load_q(qv, p.q + q_off, lane);

    int lo, hi;
    visible_range(i, sq, sk, p.window_left, p.window_right, &lo, &hi);
    const float scale_log2 = p.softmax_scale * LOG2E;
    const int* __restrict__ table = p.block_table + (long long)b * p.max_blocks_per_seq;

    RowState st;
    row_init(st, p.sinks, h);
    for (int j = lo; j < hi; ++j) {
        const long long block = table[j / block_size];
        const long long row = block * block_size + (j % block_size);
        const long long kv_off = (row * num_groups + g) * HEAD_DIM;
        const float s = row_dot(qv, k_pool + kv_off, lane) * scale_log2;
        row_update(st, s, v_pool + kv_off, lane);
    }
    row_finish(st, p.out + q_off, p.gate + q_off, p.lse + (long long)h * total_q + q_tok, lane);
}
