// Kernel `{{ key }}`: attention over a static KV cache (decode / chunked prefill), rendered
// from templates/decode_rows.cu. dtype {{ dtype }}, head dim {{ head_dim }}, causal {{ causal_mode }},
// window {{ has_window }}, sinks {{ sinks }}, output gate {{ has_gate }}, {{ block_rows }} query rows per block.
//
// The seqlen_q new queries of sequence b attend to cache rows [0, seqlens_k[b]) (the new
// keys already appended). Bottom-right alignment: query i sits at key position
// i + seqlens_k[b] - seqlen_q.
//
// Launch: grid (ceil(seqlen_q / {{ block_rows }}), num_heads, batch), block ({{ block_rows }} * 32).
// Parameters: one `const FwdParams p` (partials/params.cu); read: q, k / v
// (the cache layer), out, lse, batch, num_heads, num_groups, seqlen_q, softmax_scale,
// window_left/right, sinks, gate, cache_seqlens_k (seqlens_k below), cache_batch_offset
// (batch_offset), cache_max_batch (max_batch).
//
// Layouts (row-major):
//   q, out, gate: elem_t [seqlen_q, batch, num_heads, HEAD_DIM]
//   k_cache, v_cache: elem_t [max_seq, max_batch, num_groups, HEAD_DIM]; sequence b lives at
//       batch slot batch_offset + b.
//   seqlens_k: int32 [batch]
//   lse: f32 [num_heads, seqlen_q * batch], row = i * batch + b
//   sinks: f32 [num_heads] (learnable sinks only)

{% include "partials/rows_kernel.cu" %}
    const elem_t* __restrict__ k_cache = p.k;
    const elem_t* __restrict__ v_cache = p.v;
    const int batch = p.batch, num_heads = p.num_heads, num_groups = p.num_groups;
    const int seqlen_q = p.seqlen_q, max_batch = p.cache_max_batch;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int i = blockIdx.x * BLOCK_ROWS + warp;
    const int g = h / (num_heads / num_groups);
    if (i >= seqlen_q) return;
    const int sk = p.cache_seqlens_k[b];

    const long long q_tok = (long long)i * batch + b;
    const long long q_off = (q_tok * num_heads + h) * HEAD_DIM;
    float qv[LANE_D];
    load_q(qv, p.q + q_off, lane);

    int lo, hi;
    visible_range(i, seqlen_q, sk, p.window_left, p.window_right, &lo, &hi);
    const float scale_log2 = p.softmax_scale * LOG2E;
    const long long slot = (long long)p.cache_batch_offset + b;

    RowState st;
    row_init(st, p.sinks, h);
    for (int j = lo; j < hi; ++j) {
        const long long kv_off = (((long long)j * max_batch + slot) * num_groups + g) * HEAD_DIM;
        const float s = row_dot(qv, k_cache + kv_off, lane) * scale_log2;
        row_update(st, s, v_cache + kv_off, lane);
    }
    row_finish(st, p.out + q_off, p.gate + q_off, p.lse + (long long)h * seqlen_q * batch + q_tok, lane);
}
