// Module `{{ key }}`: kernels of the CUDA layer's backward (training), rendered by
// attention-runtime/src/cuda/train_ops.rs from templates/layer_backward.cu.
// dtype {{ dtype }}, head dim {{ head_dim }}, q/k norm {{ qk_norm }}, rope {{ rope }} over the
// first {{ rot_dim }} channels, output gate {{ has_gate }}.
//
// Entries (every reduction has a fixed order: no atomics, bitwise-reproducible results):
//
// `qkv_prep_backward_...` (QkvPrepBwdParams, grid num_tokens, block PREP_WARPS * 32): the
//   backward of qkv_prep for self-attention. One block per token, one warp per head vector
//   (as the forward). For q and k: rope backward (the inverse rotation; the adjoint with
//   mscale), then the q/k norm backward (statistics recomputed in f32 from the saved raw q/k
//   in the linear_qkv output, as the forward computed them), written into the
//   GQA-interleaved linear_qkv column of the vector; v and the gate gradient are copied into
//   their columns. Every column of dqkv [num_tokens, W] is written. With a q/k norm and
//   norm_partials non-null, each block writes its token's partial sums
//   norm_partials[t][4][HEAD_DIM] = (sum dy*xhat for q, sum dy for q, the same for k),
//   summed over the token's heads in a fixed order (warp w owns heads w, w + PREP_WARPS,
//   ...; warps summed in order); column_sum_f32 reduces them over tokens.
//   A head dim that is not a multiple of 32 (80) pads each lane's last chunk (LANE_D,
//   ch_ok / load_ch / store_ch of partials/types.cu): the missing channels read as zero, are
//   never written, and add nothing to the LayerNorm statistics or the xhat / g terms.
// `gate_backward_{{ dtype }}` (n, grid-stride): y = o * sigmoid(g):
//   d_o = dy * sigmoid(g), d_g = dy * o * sigmoid(g) * (1 - sigmoid(g)) (f32 math, stored
//   as elem_t).
// `kv_interleave_backward_{{ dtype }}` (vecs, grid-stride): cross-attention's linear_kv
//   output gradient from dk, dv [vecs = num_kv_tokens * num_heads, HEAD_DIM]: per head
//   [dk_h | dv_h], dkv [vecs, 2 * HEAD_DIM] (the forward's per-head [k_h | v_h] layout).
// `column_sum_{{ dtype }}` / `column_sum_f32_{{ dtype }}` (grid (ceil(cols / 256), chunks),
//   block 256): dst[chunk][col] = sum of src[r][col] over rows r of the chunk
//   (chunk * rows_per_chunk ..), in row order, f32. Two passes (rows in chunks, then the
//   chunks in one) give deterministic column sums of any height.
// `bias_grad_reduce_{{ dtype }}` (grid-stride over the bias's elements, block 256): the
//   additive attention bias's gradient in the bias's own (broadcast) shape from the attention
//   backward's dense f32 dS [B, H, I, J]: out[e] = sum of dS over every position bias element
//   e feeds (broadcast dims, bias extent 1, summed whole), in fixed (b, h, i, j) order: no
//   atomics, deterministic.
// `max_logit_fold_{{ dtype }}` (n, grid ceil(n / 256), block 256): QK-Clip's running record,
//   running[i] = max(running[i], src[i]) over f32 [n = num_heads] (a NaN in src sticks, as
//   the host record's observe does, and the clip then refuses): the layer's device record raised by one training
//   forward's per-head max logit, without a host round trip.
// `qk_clip_scale_rows_{{ dtype }}` (rows * cols, grid-stride, block 256): QK-Clip's rescale
//   of linear_qkv.weight [rows, cols] in place, w[r][c] *= row_factor[r] (f32 product,
//   rounded once to elem_t); rows whose factor is exactly 1 are not rewritten.

{{ types }}

constexpr int PREP_WARPS = 4;
/// Rotated channels (head_dim * rotary_percent); 0 = no rope.
constexpr int ROT_DIM = {{ rot_dim }};
static_assert(ROT_DIM % 2 == 0 && ROT_DIM <= HEAD_DIM, "rotary dim must be even and <= head dim");
/// q/k norm: 0 none, 1 LayerNorm, 2 RMSNorm, 3 L2.
#define QK_NORM {{ qk_norm_id }}
/// Rope: 0 none, 1 half (rotate_half), 2 interleaved (adjacent pairs).
#define ROPE {{ rope_id }}
/// Output gate columns in linear_qkv.
#define HAS_GATE {{ has_gate_id }}

/// Parameters of qkv_prep_backward (the host struct is `QkvPrepBwdParams` in
/// attention-runtime/src/cuda/train_ops.rs; pointers 8 bytes, then f32, then int32).
struct QkvPrepBwdParams {
    /// The forward's linear_qkv output elem_t [num_tokens, W] (raw q/k before the norm).
    const elem_t* qkv;
    /// Gradients of the attention inputs (post-rope q, k; v): [num_tokens, num_heads, HD],
    /// [num_tokens, num_groups, HD] x2.
    const elem_t* dq;
    const elem_t* dk;
    const elem_t* dv;
    /// Gradient of the raw gate [num_tokens, num_heads, HD] (output gate), or null.
    const elem_t* dgate;
    /// Written: gradient of the linear_qkv output [num_tokens, W].
    elem_t* dqkv;
    /// Written (q/k norm, or null): f32 [num_tokens, 4, HD] per-token weight/bias partials.
    float* norm_partials;
    const elem_t* q_norm_weight;
    const elem_t* q_norm_bias;
    const elem_t* k_norm_weight;
    const elem_t* k_norm_bias;
    /// int32 [num_tokens] rope positions (rope), or null.
    const int* positions;
    float eps;
    float rotary_base;
    float mscale;
    int num_tokens;
    int num_heads;
    int num_groups;
};

/// Rope backward of one head vector held across the warp: dx_j = dy_j cos m - s_j dy_p(j) sin m
/// (p the partner channel, s_j its sign in the forward: the forward rotation's transpose).
/// `tc` / `ts`: cos * mscale and sin * mscale per rotated channel (shared memory).
__device__ __forceinline__ void rope_backward(float (&y)[LANE_D], float* stage,
                                              const float* tc, const float* ts, int lane) {
#if ROPE != 0
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) stage[c * WARP_SIZE + lane] = y[c];  // LANE_D * 32 floats
    __syncwarp();
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        const int d = c * WARP_SIZE + lane;
        if (d < ROT_DIM) {
#if ROPE == 1
            const int half = ROT_DIM / 2;
            const int partner = d < half ? d + half : d - half;
            const float sign = d < half ? -1.0f : 1.0f;
#else
            const int partner = d ^ 1;
            const float sign = (d & 1) ? 1.0f : -1.0f;
#endif
            y[c] = y[c] * tc[d] - sign * stage[partner] * ts[d];
        }
    }
    __syncwarp();
#else
    (void)y; (void)stage; (void)tc; (void)ts; (void)lane;
#endif
}

/// q/k norm backward of one head vector: `y` holds dL/d(norm output), becomes dL/dx; `x` the
/// raw input. xhat = (x - mean) r (LayerNorm) or x r (RMS / L2), g = dy w (w = 1 for L2):
/// LayerNorm dx = r (g - mean(g) - xhat mean(g xhat)), RMS / L2 dx = r (g - xhat mean(g xhat)).
/// acc_w += dy xhat, acc_b += dy (the parameter gradients' partial sums).
__device__ __forceinline__ void norm_backward(float (&y)[LANE_D], const float (&x)[LANE_D],
                                              const elem_t* __restrict__ weight, float eps,
                                              float (&acc_w)[LANE_D], float (&acc_b)[LANE_D],
                                              int lane) {
#if QK_NORM != 0
#if QK_NORM == 1
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) s += x[c];
    const float mean = warp_sum(s) / HEAD_DIM;
    float s2 = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c)
        if (ch_ok(c, lane)) s2 += (x[c] - mean) * (x[c] - mean);
#else
    const float mean = 0.0f;
    float s2 = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) s2 += x[c] * x[c];
#endif
    const float r = rsqrtf(warp_sum(s2) / HEAD_DIM + eps);
    float xh[LANE_D], g[LANE_D];
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        // A channel past HEAD_DIM (head dim 80) has x = y = 0 and must add nothing: xhat 0.
        xh[c] = ch_ok(c, lane) ? (x[c] - mean) * r : 0.0f;
#if QK_NORM == 3
        g[c] = y[c];
#else
        g[c] = y[c] * load_ch(weight, c, lane);
#endif
        acc_w[c] += y[c] * xh[c];
        acc_b[c] += y[c];
        sg += g[c];
        sgx += g[c] * xh[c];
    }
    const float mgx = warp_sum(sgx) / HEAD_DIM;
#if QK_NORM == 1
    const float mg = warp_sum(sg) / HEAD_DIM;
#else
    const float mg = 0.0f;
    (void)sg;
#endif
#if QK_NORM == 3
    (void)weight;
#endif
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) y[c] = ch_ok(c, lane) ? r * (g[c] - mg - xh[c] * mgx) : 0.0f;
#else
    (void)y; (void)x; (void)weight; (void)eps; (void)acc_w; (void)acc_b; (void)lane;
#endif
}

/// q (kind 0) or k (kind 1) head vectors of token t: rope backward, norm backward (partials
/// into acc_w / acc_b), written to their linear_qkv columns.
__device__ __forceinline__ void qk_heads_backward(const QkvPrepBwdParams& p, int kind, long long t,
                                                  const float* tc, const float* ts, float* stage, float (&acc_w)[LANE_D],
                                                  float (&acc_b)[LANE_D], int warp, int lane) {
    const int num_heads = p.num_heads, num_groups = p.num_groups;
    const int per = num_heads / num_groups;
    constexpr int G = HAS_GATE ? 2 : 1;
    const long long group_width = (long long)(per * G + 2) * HEAD_DIM;
    const long long row_width = group_width * num_groups;
    const int count = kind == 0 ? num_heads : num_groups;
#if QK_NORM != 0
    const elem_t* __restrict__ weight = kind == 0 ? p.q_norm_weight : p.k_norm_weight;
#endif
    for (int head = warp; head < count; head += PREP_WARPS) {
        long long off;
        const elem_t* src;
        if (kind == 0) {
            off = (head / per) * group_width + (long long)(head % per) * HEAD_DIM;
            src = p.dq + (t * num_heads + head) * HEAD_DIM;
        } else {
            off = head * group_width + (long long)per * G * HEAD_DIM;
            src = p.dk + (t * num_groups + head) * HEAD_DIM;
        }
        float y[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c)
            y[c] = ch_ok(c, lane) ? load_elem(src + c * WARP_SIZE + lane) : 0.0f;
        rope_backward(y, stage, tc, ts, lane);
#if QK_NORM != 0
        float x[LANE_D];
        const elem_t* xs = p.qkv + t * row_width + off;
#pragma unroll
        for (int c = 0; c < LANE_D; ++c)
            x[c] = ch_ok(c, lane) ? load_elem(xs + c * WARP_SIZE + lane) : 0.0f;
        norm_backward(y, x, weight, p.eps, acc_w, acc_b, lane);
#else
        (void)acc_w; (void)acc_b;
#endif
        elem_t* dst = p.dqkv + t * row_width + off;
#pragma unroll
        for (int c = 0; c < LANE_D; ++c)
            if (ch_ok(c, lane)) store_elem(dst + c * WARP_SIZE + lane, y[c]);
    }
}

extern "C" __global__ void __launch_bounds__(PREP_WARPS * WARP_SIZE) {{ prep_key }}(const QkvPrepBwdParams p)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const long long t = blockIdx.x;
    if (t >= p.num_tokens) return;  // uniform over the block
    // Whole chunks (head dim 80: the padded lanes stage their zeros past HEAD_DIM).
    __shared__ float stage[PREP_WARPS][LANE_D * WARP_SIZE];
#if QK_NORM != 0
    // Per-warp partial sums: [warp][dw_q, db_q, dw_k, db_k][channel].
    __shared__ float red[PREP_WARPS][4][HEAD_DIM];
#endif
    // One cos/sin table per token (as the forward's qkv_prep computes them), shared by its
    // q and k heads: one channel per thread.
    __shared__ float tab_c[HEAD_DIM], tab_s[HEAD_DIM];
#if ROPE != 0
    {
        const float pos = (float)p.positions[t];
        for (int d = threadIdx.x; d < ROT_DIM; d += PREP_WARPS * WARP_SIZE) {
#if ROPE == 1
            const int f = d < ROT_DIM / 2 ? d : d - ROT_DIM / 2;
#else
            const int f = d / 2;
#endif
            const float inv_freq = 1.0f / powf(p.rotary_base, (float)(2 * f) / (float)ROT_DIM);
            float sn, cs;
            sincosf(pos * inv_freq, &sn, &cs);
            tab_c[d] = cs * p.mscale;
            tab_s[d] = sn * p.mscale;
        }
        __syncthreads();
    }
#endif
    // q heads, then k heads: one set of accumulators live at a time.
#pragma unroll 1
    for (int kind = 0; kind < 2; ++kind) {
        float acc_w[LANE_D], acc_b[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) acc_w[c] = acc_b[c] = 0.0f;
        qk_heads_backward(p, kind, t, tab_c, tab_s, stage[warp], acc_w, acc_b, warp, lane);
#if QK_NORM != 0
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            if (!ch_ok(c, lane)) continue;
            red[warp][2 * kind][c * WARP_SIZE + lane] = acc_w[c];
            red[warp][2 * kind + 1][c * WARP_SIZE + lane] = acc_b[c];
        }
#endif
    }
    // v and gate gradients: copied into their columns.
    {
        const int num_heads = p.num_heads, num_groups = p.num_groups;
        const int per = num_heads / num_groups;
        constexpr int G = HAS_GATE ? 2 : 1;
        const long long group_width = (long long)(per * G + 2) * HEAD_DIM;
        const long long row_width = group_width * num_groups;
        const int n_copy = num_groups + (HAS_GATE ? num_heads : 0);
        for (int idx = warp; idx < n_copy; idx += PREP_WARPS) {
            long long off;
            const elem_t* src;
            if (idx < num_groups) {
                off = idx * group_width + ((long long)per * G + 1) * HEAD_DIM;
                src = p.dv + (t * num_groups + idx) * HEAD_DIM;
            } else {
                const int head = idx - num_groups;
                off = (head / per) * group_width + ((long long)per + head % per) * HEAD_DIM;
                src = p.dgate + (t * num_heads + head) * HEAD_DIM;
            }
            elem_t* dst = p.dqkv + t * row_width + off;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c)
                if (ch_ok(c, lane)) dst[c * WARP_SIZE + lane] = src[c * WARP_SIZE + lane];
        }
    }
#if QK_NORM != 0
    if (p.norm_partials != nullptr) {
        __syncthreads();
        for (int e = threadIdx.x; e < 4 * HEAD_DIM; e += PREP_WARPS * WARP_SIZE) {
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < PREP_WARPS; ++w) s += red[w][e / HEAD_DIM][e % HEAD_DIM];
            p.norm_partials[t * 4 * HEAD_DIM + e] = s;
        }
    }
#endif
}

extern "C" __global__ void __launch_bounds__(256) gate_backward_{{ dtype }}(
    const elem_t* __restrict__ dy, const elem_t* __restrict__ o, const elem_t* __restrict__ gate,
    elem_t* __restrict__ d_o, elem_t* __restrict__ d_gate, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float s = 1.0f / (1.0f + expf(-load_elem(gate + i)));
        const float g = load_elem(dy + i);
        store_elem(d_o + i, g * s);
        store_elem(d_gate + i, g * load_elem(o + i) * s * (1.0f - s));
    }
}

extern "C" __global__ void __launch_bounds__(256) kv_interleave_backward_{{ dtype }}(
    const elem_t* __restrict__ dk, const elem_t* __restrict__ dv, elem_t* __restrict__ dkv,
    long long vecs)
{
    const long long n = vecs * HEAD_DIM;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long vec = i / HEAD_DIM;
        const int d = (int)(i % HEAD_DIM);
        dkv[vec * 2 * HEAD_DIM + d] = dk[i];
        dkv[vec * 2 * HEAD_DIM + HEAD_DIM + d] = dv[i];
    }
}

extern "C" __global__ void __launch_bounds__(256) column_sum_{{ dtype }}(
    const elem_t* __restrict__ src, float* __restrict__ dst, int rows, int cols, int rows_per_chunk)
{
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : (long long)rows;
    float s = 0.0f;
    for (long long r = r0; r < r1; ++r) s += load_elem(src + r * cols + col);
    dst[(long long)blockIdx.y * cols + col] = s;
}

extern "C" __global__ void __launch_bounds__(256) column_sum_f32_{{ dtype }}(
    const float* __restrict__ src, float* __restrict__ dst, int rows, int cols, int rows_per_chunk)
{
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : (long long)rows;
    float s = 0.0f;
    for (long long r = r0; r < r1; ++r) s += src[r * cols + col];
    dst[(long long)blockIdx.y * cols + col] = s;
}

extern "C" __global__ void __launch_bounds__(256) bias_grad_reduce_{{ dtype }}(
    const float* __restrict__ dense, float* __restrict__ out, int B, int H, int I, int J,
    int bb, int bh, int bi, int bj)
{
    const long long n = (long long)bb * bh * bi * bj;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int j0 = (int)(e % bj);
        const int i0 = (int)((e / bj) % bi);
        const int h0 = (int)((e / ((long long)bj * bi)) % bh);
        const int b0 = (int)(e / ((long long)bj * bi * bh));
        const int b_lo = bb == 1 ? 0 : b0, b_hi = bb == 1 ? B : b0 + 1;
        const int h_lo = bh == 1 ? 0 : h0, h_hi = bh == 1 ? H : h0 + 1;
        const int i_lo = bi == 1 ? 0 : i0, i_hi = bi == 1 ? I : i0 + 1;
        const int j_lo = bj == 1 ? 0 : j0, j_hi = bj == 1 ? J : j0 + 1;
        float s = 0.0f;
        for (int b = b_lo; b < b_hi; ++b)
            for (int h = h_lo; h < h_hi; ++h)
                for (int i = i_lo; i < i_hi; ++i) {
                    const float* row = dense + (((long long)b * H + h) * I + i) * J;
                    for (int j = j_lo; j < j_hi; ++j) s += row[j];
                }
        out[e] = s;
    }
}

extern "C" __global__ void __launch_bounds__(256) max_logit_fold_{{ dtype }}(
    const float* __restrict__ src, float* __restrict__ running, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float s = src[i];
    if (s > running[i] || s != s) running[i] = s;
}

extern "C" __global__ void __launch_bounds__(256) qk_clip_scale_rows_{{ dtype }}(
    elem_t* __restrict__ w, const float* __restrict__ row_factor, long long rows, int cols)
{
    const long long n = rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float f = row_factor[i / cols];
        if (f != 1.0f) store_elem(w + i, load_elem(w + i) * f);
    }
}
