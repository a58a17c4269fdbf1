// Module `{{ key }}`: the helper kernels of context-parallel core attention's backward on the
// GPU, rendered by attention-runtime/src/cuda/cp_backward_kernels.rs (dtype {{ dtype }}, head
// dim {{ head_dim }}). The backward itself runs on the single-GPU attention backward kernels
// (backward_preprocess / backward_sm80) once per planned launch with the forward's global
// LSE; these kernels slice that LSE, add each launch's dq / dk / dv into f32 accumulators,
// round the sums once, and compute the learnable sinks' gradient over a rank's rows.
//
// `cpb_add_rows_{{ dtype }}` (grid-stride over n * width, block 256):
//   acc[(row0 + r) * width + c] += src[r * width + c]   (acc f32, src elem_t, r < n).
// `cpb_cast_{{ dtype }}` (grid-stride, block 256): dst[e] = src[e] rounded to elem_t.
// `cpb_lse_slice` (grid-stride over num_heads * n, block 256): dst[h * n + i] =
//   src[h * rows + row0 + i]: rows row0 .. row0 + n of an f32 [num_heads, rows] LSE.
// `cpb_lse_sink` (grid-stride over num_heads * rows, block 256): the sink column joins the
//   softmax of an LSE merged without it (sink_mode 1: a zero logit, 2: sinks[h]):
//   lse = log(exp(lse) + exp(sink)); a row with LSE -inf (no key seen) becomes the sink.
// `cpb_dsinks_{{ dtype }}` (grid num_heads, block 256: one block per head, fixed-order
//   reduction): dsinks[h] = -sum_i exp(sinks[h] - lse[h, i]) * D[i, h],
//   D[i, h] = sum_c dout[i, h, c] * out[i, h, c] (out, dout elem_t [rows, num_heads,
//   HEAD_DIM], lse f32 [num_heads, rows] with the sink joined), FlashAttention's sink
//   gradient (attention_backward.rs).

{{ types }}

__device__ __forceinline__ float cpb_neg_inf() { return __int_as_float(0xff800000); }

extern "C" __global__ void __launch_bounds__(256) cpb_add_rows_{{ dtype }}(
    float* __restrict__ acc, const elem_t* __restrict__ src, long long row0, long long n,
    int width)
{
    const long long total = n * width;
    float* base = acc + row0 * width;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x)
        base[e] += load_elem(src + e);
}

extern "C" __global__ void __launch_bounds__(256) cpb_cast_{{ dtype }}(
    const float* __restrict__ src, elem_t* __restrict__ dst, long long n)
{
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        store_elem(dst + e, src[e]);
}

extern "C" __global__ void __launch_bounds__(256) cpb_lse_slice(
    const float* __restrict__ src, float* __restrict__ dst, int num_heads, long long rows,
    long long row0, long long n)
{
    const long long total = (long long)num_heads * n;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long h = e / n, i = e % n;
        dst[e] = src[h * rows + row0 + i];
    }
}

extern "C" __global__ void __launch_bounds__(256) cpb_lse_sink(
    float* __restrict__ lse, const float* __restrict__ sinks, int sink_mode, int num_heads,
    long long rows)
{
    const long long total = (long long)num_heads * rows;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int h = (int)(e / rows);
        const float s = sink_mode == 1 ? 0.0f : sinks[h];
        const float l = lse[e];
        if (l == cpb_neg_inf()) {
            lse[e] = s;
        } else {
            const float m = fmaxf(l, s);
            lse[e] = m + logf(expf(l - m) + expf(s - m));
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) cpb_dsinks_{{ dtype }}(
    const elem_t* __restrict__ out, const elem_t* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ sinks, float* __restrict__ dsinks,
    int num_heads, long long rows)
{
    __shared__ float part[256];
    const int h = blockIdx.x;
    const float s = sinks[h];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < rows; i += blockDim.x) {
        const float l = lse[(long long)h * rows + i];
        if (l == cpb_neg_inf()) continue;
        const elem_t* o = out + (i * num_heads + h) * HEAD_DIM;
        const elem_t* d = dout + (i * num_heads + h) * HEAD_DIM;
        float dd = 0.0f;
        for (int c = 0; c < HEAD_DIM; ++c) dd += load_elem(o + c) * load_elem(d + c);
        acc += expf(s - l) * dd;
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) dsinks[h] = -part[0];
}
