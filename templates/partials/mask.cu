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
