// Kernel `{{ key }}`: attention backward preprocessing, rendered from
// templates/backward_preprocess.cu. dtype {{ dtype }}, head dim {{ head_dim }}.
//
// Parameters: one `const BwdParams p` (partials/params_bwd.cu); read: out, dout, lse, sinks,
// num_heads, total_q; written: dpsum, dsinks, and dq_accum when not null (zeroed: the fast
// mode's f32 dQ accumulator, layout of q, which the fused kernel launched after this one adds
// into; zeroing it here saves a separate memset pass, as FlashAttention-3's preprocess does).
// Layout-free: a row is a token (padded [seqlen_q, batch] rows flattened, or packed tokens),
// out / dout [total_q, num_heads, HEAD_DIM], lse / dpsum f32 [num_heads, total_q].
//
// `{{ key }}`: D[h, row] = sum_d dout * out (f32), the row term of dS = P o (dP - D). One warp
//   per (row, head): grid (ceil(total_q / PRE_ROWS), num_heads), block PRE_ROWS * 32.
// `{{ key }}_dsink`: learnable sinks' gradient dsinks[h] = -sum_rows exp(sinks[h] - lse) * D
//   (the sink column's P times its dP - D, dP = 0: the sink has no value), summed in a fixed
//   order (per-thread strided sums, then a shared-memory tree): bitwise reproducible. Grid
//   (num_heads), block DSINK_THREADS; run after the first entry. Rows with LSE -inf add 0.

{% include "partials/types.cu" %}
{% include "partials/params_bwd.cu" %}

constexpr int PRE_ROWS = 8;
static_assert(HEAD_DIM % 4 == 0, "dq_accum rows are zeroed 16 bytes at a time");
constexpr int DSINK_THREADS = 256;

extern "C" __global__ void __launch_bounds__(PRE_ROWS * WARP_SIZE) {{ key }}(const BwdParams p) {
    const int lane = threadIdx.x % WARP_SIZE;
    const long long row = (long long)blockIdx.x * PRE_ROWS + threadIdx.x / WARP_SIZE;
    const int h = blockIdx.y;
    if (row >= p.total_q) return;
    const long long off = (row * p.num_heads + h) * HEAD_DIM;
    if (p.dq_accum != nullptr) {
        float4* z = reinterpret_cast<float4*>(p.dq_accum + off);
        for (int c = lane; c < HEAD_DIM / 4; c += WARP_SIZE) z[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float acc = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c)  // lanes past HEAD_DIM (head dim 80) read zeros
        acc = fmaf(load_ch(p.dout + off, c, lane), load_ch(p.out + off, c, lane), acc);
    acc = warp_sum(acc);
    if (lane == 0) p.dpsum[(long long)h * p.total_q + row] = acc;
}

extern "C" __global__ void __launch_bounds__(DSINK_THREADS) {{ key }}_dsink(const BwdParams p) {
    __shared__ float part[DSINK_THREADS];
    const int h = blockIdx.x;
    const float sink = p.sinks[h];
    const long long base = (long long)h * p.total_q;
    float acc = 0.0f;
    for (long long r = threadIdx.x; r < p.total_q; r += DSINK_THREADS) {
        const float lse = p.lse[base + r];
        if (lse != neg_inf()) acc -= expf(sink - lse) * p.dpsum[base + r];
    }
    part[threadIdx.x] = acc;
    __syncthreads();
#pragma unroll
    for (int w = DSINK_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) p.dsinks[h] = part[0];
}
