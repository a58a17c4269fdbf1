// Kernel `{{ key }}`: one decode step over a static KV cache (flash-decoding), rendered from
// templates/flash_decode.cu. dtype {{ dtype }}, head dim {{ head_dim }}, causal {{ causal_mode }},
// window {{ has_window }}, rope {{ rope }} over {{ rot_dim }} channels, {{ decode_tile }} keys per tile.
//
// `{{ key }}` (split kernel), one block per (split, group, sequence), one warp per query head
// of the group (heads h_local = warp + r * warps, r = 0, 1, ...): for sequence b at position
// pos = cache_seqlens[b] it
//   1. rotates the new k (and each warp its q) with the cos/sin tables at row pos,
//   2. appends the rotated k and v at cache row pos (the block whose split owns pos writes),
//   3. attends over keys [lo, hi) of its split of the visible range [0, pos + 1) (bottom-right
//      causal, window), each K/V tile loaded into shared memory once for all heads of the group,
//   and writes the split's normalized partial output and its LSE (log2 units, -inf = no key).
// `{{ key }}_merge`: one warp per (sequence, head) merges the splits by their LSEs, adds the
// sink column, applies the output gate and writes out and lse.
//
// Launch: split kernel grid (num_splits, num_groups, batch), block min(per, 8) * 32;
//         merge kernel grid (batch, num_heads), block 32.
//
// Layouts (row-major):
//   q, out, gate: elem_t [batch, num_heads, HEAD_DIM]   (q not yet rotated)
//   k_new, v_new: elem_t [batch, num_groups, HEAD_DIM]  (k not yet rotated)
//   k_cache, v_cache: elem_t [max_seq, max_batch, num_groups, HEAD_DIM]; sequence b at batch
//       slot batch_offset + b; offsets are 64-bit.
//   cache_seqlens: int32 [batch]; rope_cos, rope_sin: f32 [rope_rows, ROT_DIM / 2]
//   o_part: f32 [num_splits, batch, num_heads, HEAD_DIM]; lse_part: f32 [num_splits, batch, num_heads]
//   lse: f32 [num_heads, batch] (natural log); sinks: f32 [num_heads] (learnable sinks only)

{% include "partials/types.cu" %}
{% include "partials/mask.cu" %}

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
{%- if rope != "none" %}
constexpr int ROT_DIM = {{ rot_dim }};
{%- endif %}
constexpr int TILE = {{ decode_tile }};
constexpr int MAX_WARPS = 8;

/// Rotate the row held in `stage` (f32 [HEAD_DIM]) into x (lane's channels) at table row `pos`.
__device__ __forceinline__ void rope_row(float (&x)[LANE_D], const float* stage,
                                         const float* __restrict__ rope_cos,
                                         const float* __restrict__ rope_sin, long long pos, int lane) {
{%- if rope == "none" %}
    (void)x; (void)stage; (void)rope_cos; (void)rope_sin; (void)pos; (void)lane;
{%- else %}
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        const int d = c * WARP_SIZE + lane;
        if (d < ROT_DIM) {
{%- if rope == "half" %}
            const int half = ROT_DIM / 2;
            const int f = d < half ? d : d - half;
            const int partner = d < half ? d + half : d - half;
            const float sign = d < half ? -1.0f : 1.0f;
{%- else %}
            const int f = d / 2;
            const int partner = d ^ 1;
            const float sign = (d & 1) ? 1.0f : -1.0f;
{%- endif %}
            const float cs = rope_cos[pos * (ROT_DIM / 2) + f];
            const float sn = rope_sin[pos * (ROT_DIM / 2) + f];
            x[c] = x[c] * cs + sign * stage[partner] * sn;
        }
    }
{%- endif %}
}

extern "C" __global__ void __launch_bounds__(MAX_WARPS * WARP_SIZE) {{ key }}(
    const elem_t* __restrict__ q,
    const elem_t* __restrict__ k_new,
    const elem_t* __restrict__ v_new,
    elem_t* __restrict__ k_cache,
    elem_t* __restrict__ v_cache,
    const int* __restrict__ cache_seqlens,
    const float* __restrict__ rope_cos,
    const float* __restrict__ rope_sin,
    float* __restrict__ o_part,
    float* __restrict__ lse_part,
    int batch,
    int batch_offset,
    int max_batch,
    int num_heads,
    int num_groups,
    int num_splits,
    float softmax_scale,
    int window_left,
    int window_right)
{
    __shared__ elem_t k_tile[TILE][HEAD_DIM];
    __shared__ elem_t v_tile[TILE][HEAD_DIM];
    __shared__ elem_t k_row[HEAD_DIM];
    __shared__ elem_t v_row[HEAD_DIM];
    __shared__ float stage[MAX_WARPS][HEAD_DIM];

    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    const int split = blockIdx.x;
    const int g = blockIdx.y;
    const int b = blockIdx.z;
    const int per = num_heads / num_groups;
    const long long pos = cache_seqlens[b];
    const int sk = (int)pos + 1;
    const long long slot = (long long)batch_offset + b;

    // 1. The new key (rotated) and value of this group, into shared memory.
    if (warp == 0) {
        const elem_t* kn = k_new + ((long long)b * num_groups + g) * HEAD_DIM;
        const elem_t* vn = v_new + ((long long)b * num_groups + g) * HEAD_DIM;
        float x[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            x[c] = load_elem(kn + c * WARP_SIZE + lane);
            stage[0][c * WARP_SIZE + lane] = x[c];
        }
        __syncwarp();
        rope_row(x, stage[0], rope_cos, rope_sin, pos, lane);
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            store_elem(&k_row[c * WARP_SIZE + lane], x[c]);
            v_row[c * WARP_SIZE + lane] = vn[c * WARP_SIZE + lane];
        }
    }
    __syncthreads();

    int lo, hi;
    visible_range(0, 1, sk, window_left, window_right, &lo, &hi);
    const int chunk = (hi - lo + num_splits - 1) / num_splits;
    const int s_lo = min(hi, lo + split * chunk);
    const int s_hi = min(hi, s_lo + chunk);
    const int owner = (pos >= lo && pos < hi && chunk > 0) ? (int)((pos - lo) / chunk) : 0;

    // 2. Append (the owning split only; every other block reads the new row from smem).
    if (split == owner) {
        const long long off = ((pos * max_batch + slot) * num_groups + g) * HEAD_DIM;
        for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
            k_cache[off + d] = k_row[d];
            v_cache[off + d] = v_row[d];
        }
    }

    // 3. Attention over [s_lo, s_hi), one warp per head, rounds when per > warps.
    const float scale_log2 = softmax_scale * LOG2E;
    for (int r0 = 0; r0 < per; r0 += warps) {
        const int hl = r0 + warp;
        const bool active = hl < per;
        const int h = g * per + (active ? hl : 0);
        float qv[LANE_D];
        {
            const elem_t* qr = q + ((long long)b * num_heads + h) * HEAD_DIM;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) {
                qv[c] = load_elem(qr + c * WARP_SIZE + lane);
                stage[warp][c * WARP_SIZE + lane] = qv[c];
            }
            __syncwarp();
            rope_row(qv, stage[warp], rope_cos, rope_sin, pos, lane);
        }
        float acc[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) acc[c] = 0.0f;
        float m = neg_inf(), l = 0.0f;
        for (int t0 = s_lo; t0 < s_hi; t0 += TILE) {
            const int n = min(TILE, s_hi - t0);
            __syncthreads();
            for (int e = threadIdx.x; e < n * HEAD_DIM; e += blockDim.x) {
                const int jj = e / HEAD_DIM, d = e % HEAD_DIM;
                const long long j = t0 + jj;
                if (j == pos) {
                    k_tile[jj][d] = k_row[d];
                    v_tile[jj][d] = v_row[d];
                } else {
                    const long long off = ((j * max_batch + slot) * num_groups + g) * HEAD_DIM + d;
                    k_tile[jj][d] = k_cache[off];
                    v_tile[jj][d] = v_cache[off];
                }
            }
            __syncthreads();
            if (active) {
                for (int jj = 0; jj < n; ++jj) {
                    float dot = 0.0f;
#pragma unroll
                    for (int c = 0; c < LANE_D; ++c) dot += qv[c] * load_elem(&k_tile[jj][c * WARP_SIZE + lane]);
                    const float s = warp_sum(dot) * scale_log2;
                    const float m_new = fmaxf(m, s);
                    const float corr = exp2f(m - m_new);
                    const float p = exp2f(s - m_new);
                    l = l * corr + p;
#pragma unroll
                    for (int c = 0; c < LANE_D; ++c)
                        acc[c] = acc[c] * corr + p * load_elem(&v_tile[jj][c * WARP_SIZE + lane]);
                    m = m_new;
                }
            }
        }
        if (active) {
            const long long row = ((long long)split * batch + b) * num_heads + h;
            const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) o_part[row * HEAD_DIM + c * WARP_SIZE + lane] = acc[c] * inv_l;
            if (lane == 0) lse_part[row] = l > 0.0f ? m + log2f(l) : neg_inf();
        }
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(WARP_SIZE) {{ key }}_merge(
    const float* __restrict__ o_part,
    const float* __restrict__ lse_part,
    elem_t* __restrict__ out,
    float* __restrict__ lse,
    const float* __restrict__ sinks,
    const elem_t* __restrict__ gate,
    int batch,
    int num_heads,
    int num_splits)
{
    const int lane = threadIdx.x;
    const int b = blockIdx.x;
    const int h = blockIdx.y;
    const long long row = (long long)b * num_heads + h;
    const long long split_stride = (long long)batch * num_heads;
    float mx = neg_inf();
    for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, lse_part[s * split_stride + row]);
    const bool any = mx != neg_inf();
{%- if sinks == "off_by_one" %}
    (void)sinks;
    const float sink = 0.0f;
{%- elif sinks == "learnable" %}
    const float sink = sinks[h] * LOG2E;
{%- else %}
    (void)sinks;
    const float sink = neg_inf();
{%- endif %}
    const float m = fmaxf(mx, sink);
    float total = any || sink != neg_inf() ? exp2f(sink - m) : 0.0f;
    float acc[LANE_D];
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) acc[c] = 0.0f;
    if (any) {
        for (int s = 0; s < num_splits; ++s) {
            const float ls = lse_part[s * split_stride + row];
            if (ls == neg_inf()) continue;
            const float w = exp2f(ls - m);
            total += w;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c)
                acc[c] += w * o_part[(s * split_stride + row) * HEAD_DIM + c * WARP_SIZE + lane];
        }
    }
    const float inv = any ? 1.0f / total : 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        float o = acc[c] * inv;
{%- if has_gate %}
        const float gt = load_elem(gate + row * HEAD_DIM + c * WARP_SIZE + lane);
        o *= 1.0f / (1.0f + expf(-gt));
{%- endif %}
        store_elem(out + row * HEAD_DIM + c * WARP_SIZE + lane, o);
    }
{%- if not has_gate %}
    (void)gate;
{%- endif %}
    if (lane == 0) lse[(long long)h * batch + b] = any ? (m + log2f(total)) * LN2 : neg_inf();
}
