// Module `{{ key }}`: the helper kernels of context-parallel core attention on the GPU,
// rendered by attention-runtime/src/cuda/cp_kernels.rs (dtype {{ dtype }}, head dim {{ head_dim }}).
// The attention itself runs on the forward kernels (prefill_sm80 / prefill_rows); these merge
// their partial results and move rows.
//
// `cp_merge_{{ dtype }}` (grid ceil(n * num_heads * 32 / 256), block 256: one warp per
//   (row, head)): merge a partial attention result into the running one by their LSE
//   (natural log), FlashAttention's split-KV combine:
//     m = max(la, lp), wa = exp(la - m), wp = exp(lp - m),
//     acc = (acc * wa + part * wp) / (wa + wp),   la = m + log(wa + wp).
//   acc_out f32 [acc_rows, num_heads, HEAD_DIM], acc_lse f32 [num_heads, acc_rows]; the
//   partial covers acc rows row0 .. row0 + n: part_out elem_t [n, num_heads, HEAD_DIM],
//   part_lse f32 [num_heads, n]. A partial row with LSE -inf saw no key and changes nothing;
//   a NaN in either side (output or LSE, whatever the weights) propagates to the output. The
//   running output must start at 0 with LSE -inf (its weight is then exactly 0, and 0 * 0
//   adds nothing); an unwritten (NaN) running output shows as NaN.
// `cp_finish_{{ dtype }}` (grid-stride over rows * num_heads * HEAD_DIM, block 256): the
//   output from the merged result: out = acc_out * sink factor * sigmoid(gate), rounded once
//   to elem_t. Sink factor (sink_mode 1: a zero logit, 2: sinks[h]; 0: none): the sink column
//   joins the softmax once, exp(lse - log(exp(lse) + exp(sink))); a row with LSE -inf stays
//   zero. gate elem_t [rows, num_heads, HEAD_DIM], or null.
// `cp_fill_f32` (grid-stride, block 256): p[0 .. n) = value.
// `cp_gather_rows` (grid-stride over rows * row_u4, block 256): dst row r = src row idx[r],
//   rows of row_u4 16-byte units (any element type).

{{ types }}

__device__ __forceinline__ float cp_neg_inf() { return __int_as_float(0xff800000); }

extern "C" __global__ void __launch_bounds__(256) cp_merge_{{ dtype }}(
    float* __restrict__ acc_out, float* __restrict__ acc_lse, const elem_t* __restrict__ part_out,
    const float* __restrict__ part_lse, int num_heads, long long acc_rows, long long row0,
    long long n)
{
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (w >= n * num_heads) return;
    const long long i = w / num_heads;
    const int h = (int)(w % num_heads);
    const float lp = part_lse[(long long)h * n + i];
    if (lp == cp_neg_inf()) return;
    float* la_p = acc_lse + (long long)h * acc_rows + row0 + i;
    const float la = *la_p;
    // fmaxf drops a NaN operand; the NaN then reaches wa or wp through exp. lp is finite or
    // NaN here, so m is -inf only with a NaN lp (and then wa, wp are NaN too).
    const float m = fmaxf(la, lp);
    // la = -inf (nothing seen yet): exp(-inf) = 0 exactly, and the running output is 0 there
    // (cp_acc zeroes it), so its term is exactly 0. No shortcut on wa == 0: a NaN already in
    // the running output (or one whose weight underflowed) must reach the result.
    const float wa = expf(la - m);
    const float wp = expf(lp - m);
    const float tot = wa + wp;
    const float inv = 1.0f / tot;
    float* o = acc_out + ((row0 + i) * num_heads + h) * HEAD_DIM;
    const elem_t* p = part_out + (i * num_heads + h) * HEAD_DIM;
    for (int c = lane; c < HEAD_DIM; c += WARP_SIZE)
        o[c] = (o[c] * wa + load_elem(p + c) * wp) * inv;
    __syncwarp();
    if (lane == 0) *la_p = m + logf(tot);
}

extern "C" __global__ void __launch_bounds__(256) cp_finish_{{ dtype }}(
    const float* __restrict__ acc_out, const float* __restrict__ acc_lse,
    const elem_t* __restrict__ gate, const float* __restrict__ sinks, int sink_mode,
    elem_t* __restrict__ out, int num_heads, long long rows)
{
    const long long n = rows * num_heads * HEAD_DIM;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        float x = acc_out[e];
        if (sink_mode != 0) {
            const long long i = e / ((long long)num_heads * HEAD_DIM);
            const int h = (int)((e / HEAD_DIM) % num_heads);
            const float l = acc_lse[(long long)h * rows + i];
            const float s = sink_mode == 1 ? 0.0f : sinks[h];
            if (l != cp_neg_inf()) {
                const float m = fmaxf(l, s);
                const float tot = m + logf(expf(l - m) + expf(s - m));
                x *= expf(l - tot);
            }
        }
        if (gate != nullptr) x *= 1.0f / (1.0f + expf(-load_elem(gate + e)));
        store_elem(out + e, x);
    }
}

extern "C" __global__ void __launch_bounds__(256) cp_fill_f32(float* __restrict__ p, float value,
                                                             long long n)
{
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        p[e] = value;
}

extern "C" __global__ void __launch_bounds__(256) cp_gather_rows(
    const uint4* __restrict__ src, uint4* __restrict__ dst, const int* __restrict__ idx,
    long long rows, int row_u4)
{
    const long long n = rows * row_u4;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / row_u4;
        const int c = (int)(e % row_u4);
        dst[e] = src[(long long)idx[r] * row_u4 + c];
    }
}
