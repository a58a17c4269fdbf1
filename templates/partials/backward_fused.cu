// ---------------------------------------------------------------------------------------
// What the fused backward kernels (templates/backward_dqdkdv_sm80.cu, backward_dqdkdv_sm90.cu)
// share: the 4-byte cp.async of the LSE and D rows (`load_lse_d`), the probability of one
// score under the forward's masks (`fused_prob`) and the unpacking of a {{ dtype }} pair;
// included at the end with `fused_part` set to "convert", the `<key>_dq_convert` entry that
// scales and rounds the f32 dq accumulator into dq. Needs partials/types.cu, params_bwd.cu
// and pack.cu.
// ---------------------------------------------------------------------------------------
{%- if fused_part | default(value="helpers") == "helpers" %}

/// P of one score of the fused backward: `x` = q·k of query i and key j (raw f32), masked as
/// the forward masks it: keys outside [lo, hi) unless `full` (the tile is wholly visible){%- if mask_tensor %},
/// the mask tensor's nonzero elements (`mbase`: sequence b / head h's plane; rows past `sq`
/// and keys past `sk` unread){%- endif %}{%- if has_bias %}, then the bias added (`bbase`, as
/// the mask) and the biased logit taken to log2 units{%- endif %}; then exp2 against the row's LSE `l2`
/// (log2 units; `sl2` = softmax scale / ln 2{%- if has_bias %}, `scale_nat` the scale{%- endif %}).
__device__ __forceinline__ float fused_prob(float x, int i, int j, int lo, int hi, bool full, int sq, int sk,
                                            float l2, float sl2, float scale_nat, const unsigned char* mbase,
                                            const float* bbase, const BwdParams& p) {
    if (!full && (j < lo || j >= hi)) x = neg_inf();
{%- if mask_tensor %}
    if (i < sq && j < sk && mbase[(long long)i * p.mask_stride_q + (long long)j * p.mask_stride_k] != 0)
        x = neg_inf();
{%- else %}
    (void)mbase;
{%- endif %}
{%- if has_bias %}
    if (x != neg_inf() && i < sq && j < sk)
        x = biased_logit_log2(x * scale_nat, bbase[(long long)i * p.bias_stride_q + (long long)j * p.bias_stride_k]);
    else
        x = neg_inf();
    return fast_exp2(x - l2);
{%- else %}
    (void)bbase; (void)scale_nat;
{%- if not mask_tensor %}
    (void)i; (void)sq; (void)sk; (void)p;
{%- endif %}
    return fast_exp2(fmaf(x, sl2, -l2));
{%- endif %}
}

/// 4-byte async copy global -> shared (`.ca`: the only cache mode for 4 bytes); `valid ==
/// false` zero-fills the destination.
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

/// LSE and D of the query rows m0 .. m0 + ROWS - 1 of head h into `sL` / `sD` (ROWS floats
/// each) by 4-byte cp.async, NTHREADS threads from `tid`: both `[num_heads, total_q]`, query i
/// of the sequence at row h * total_q + q_tok0 + i * q_step. Rows at or past `m_valid` read 0
/// (the caller masks their P). Asynchronous, as the tiles: a plain load would stall its warp
/// before the step's products.
template <int ROWS, int NTHREADS>
__device__ __forceinline__ void load_lse_d(float* sL, float* sD, const float* lse, const float* dpsum, int h,
                                           long long total_q, long long q_tok0, long long q_step, int m0,
                                           int m_valid, int tid) {
    for (int r = tid; r < ROWS; r += NTHREADS) {
        const bool ok = r < m_valid;
        const long long row = (long long)h * total_q + q_tok0 + (long long)(m0 + (ok ? r : 0)) * q_step;
        cp_async4(smem_addr(sL + r), lse + row, ok);
        cp_async4(smem_addr(sD + r), dpsum + row, ok);
    }
}

/// A packed pair of elem_t (`lo` in the low half) as two floats.
__device__ __forceinline__ float2 unpack2(unsigned v) {
{%- if dtype == "bf16" %}
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
{%- else %}
    float lo, hi;
    asm("{ .reg .f16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b; }"
        : "=f"(lo), "=f"(hi) : "r"(v));
    return make_float2(lo, hi);
{%- endif %}
}
{%- else %}

/// dq = softmax_scale * dq_accum, rounded to {{ dtype }}; grid-stride over
/// `total_q * num_heads * HEAD_DIM` elements, two per thread.
{%- if dq_permuted | default(value=false) %}
/// dq_accum's columns are permuted within each group of 16 (templates/backward_dqdkdv_sm90.cu,
/// step 6): its pair 2 * t + u (t < 4, u < 2) of a group holds dq's pair 4 * u + t.
{%- endif %}
extern "C" __global__ void __launch_bounds__(256) {{ key }}_dq_convert(const BwdParams p) {
    const long long n2 = (long long)p.total_q * p.num_heads * HEAD_DIM / 2;
    const float scale = p.softmax_scale;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n2;
         i += (long long)gridDim.x * blockDim.x) {
        const float2 a = reinterpret_cast<const float2*>(p.dq_accum)[i];
{%- if dq_permuted | default(value=false) %}
        const long long o = (i & ~7LL) | ((i & 1) << 2) | ((i >> 1) & 3);
{%- else %}
        const long long o = i;
{%- endif %}
        reinterpret_cast<unsigned*>(p.dq)[o] = pack2(a.x * scale, a.y * scale);
    }
}
{%- endif %}
