// ---------------------------------------------------------------------------------------
// Mask predicate. Generated part: causal mode `{{ causal_mode }}`, window {{ has_window }}.
// Query row i (0-based within its sequence of sq queries) sees key j (of sk keys) iff
//   top_left causal:      j <= i
//   bottom_right causal:  j <= i + sk - sq
//   window (L, R):        i + sk - sq - L <= j <= i + sk - sq + R   (-1 = unbounded side)
// and, for masks with a tensor, mask[b, h, i, j] == 0 (nonzero = masked out).
// ---------------------------------------------------------------------------------------

/// The half-open range [lo, hi) of keys visible to query row i by the generated mask parts.
__device__ __forceinline__ void visible_range(int i, int sq, int sk, int window_left,
                                              int window_right, int* lo, int* hi) {
    long long lo_ = 0;
    long long hi_ = sk;
{%- if causal_mode == "top_left" %}
    hi_ = min(hi_, (long long)i + 1);
{%- elif causal_mode == "bottom_right" %}
    hi_ = min(hi_, (long long)i + sk - sq + 1);
{%- endif %}
{%- if has_window %}
    const long long diag = (long long)i + sk - sq;
    if (window_left >= 0) lo_ = max(lo_, diag - window_left);
    if (window_right >= 0) hi_ = min(hi_, diag + window_right + 1);
{%- endif %}
    if (lo_ < 0) lo_ = 0;
    if (hi_ < lo_) hi_ = lo_;
    *lo = (int)lo_;
    *hi = (int)hi_;
}

// ---------------------------------------------------------------------------------------
// Additive bias. A finite bias is a finite logit: the post-scale logit `qk_scaled + bias`
// (natural units) saturates at +-BIAS_LOGIT_LIMIT (2^126) before it is multiplied by log2(e),
// so biases near f32::MIN (Hugging Face's `finfo(float32).min` masks) never overflow to -inf;
// a row of equal such biases is a uniform softmax, and such a bias beside 0 masks the key. A
// -inf bias masks the key (returns -inf); NaN propagates.
// ---------------------------------------------------------------------------------------

constexpr float BIAS_LOGIT_LIMIT = 8.5070591730234616e37f;  // 2^126
constexpr float BIAS_LOG2E = 1.4426950408889634f;

/// `qk_scaled + bias` in log2 units, saturated (see above); -inf when `bias` is -inf.
__device__ __forceinline__ float biased_logit_log2(float qk_scaled, float bias) {
    if (bias == __int_as_float(0xff800000)) return bias;
    float x = qk_scaled + bias;
    x = x < -BIAS_LOGIT_LIMIT ? -BIAS_LOGIT_LIMIT : x;  // comparisons keep NaN
    x = x > BIAS_LOGIT_LIMIT ? BIAS_LOGIT_LIMIT : x;
    return x * BIAS_LOG2E;
}

/// Whether any of the eight 16-bit elements (bf16 or f16) of a 16-byte chunk is NaN or +-Inf
/// (its exponent bits all ones).
__device__ __forceinline__ bool chunk_has_nonfinite(uint4 w) {
{%- if dtype == "bf16" %}
    constexpr unsigned EXP2 = 0x7F807F80u;
{%- else %}
    constexpr unsigned EXP2 = 0x7C007C00u;
{%- endif %}
    // x has a zero 16-bit half exactly where an element's exponent is all ones.
    const unsigned a = (w.x & EXP2) ^ EXP2, b = (w.y & EXP2) ^ EXP2;
    const unsigned c = (w.z & EXP2) ^ EXP2, d = (w.w & EXP2) ^ EXP2;
    const unsigned z = ((a - 0x00010001u) & ~a) | ((b - 0x00010001u) & ~b) |
                       ((c - 0x00010001u) & ~c) | ((d - 0x00010001u) & ~d);
    return (z & 0x80008000u) != 0u;
}
