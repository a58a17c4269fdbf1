// ---------------------------------------------------------------------------------------
// One warp computes one query row against keys [lo, hi) of its K/V group: online softmax in
// fp32, base-2 exponentials with softmax_scale * log2(e) folded into the logits.
// Sinks: `{{ sinks }}`. A row with no visible key gives zeros and LSE -inf.
// ---------------------------------------------------------------------------------------

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct RowState {
    float acc[LANE_D];  // unnormalized output, channel c * WARP_SIZE + lane (0 past HEAD_DIM)
    float m;            // running max of the logits (log2 units)
    float l;            // running sum of exp2(logit - m)
    bool any;           // whether any key was visible
};

/// Start a row: the sink column, when there is one, is an extra logit with no value.
__device__ __forceinline__ void row_init(RowState& st, const float* __restrict__ sinks, int head) {
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) st.acc[c] = 0.0f;
    st.any = false;
{%- if sinks == "off_by_one" %}
    (void)sinks; (void)head;
    st.m = 0.0f;  // zero logit column
    st.l = 1.0f;
{%- elif sinks == "learnable" %}
    st.m = sinks[head] * LOG2E;  // per-head learned logit (post-scale units)
    st.l = 1.0f;
{%- else %}
    (void)sinks; (void)head;
    st.m = neg_inf();
    st.l = 0.0f;
{%- endif %}
}

/// Fold key/value row (k_row, v_row) with logit `s` (log2 units, -inf = masked) into the row.
__device__ __forceinline__ void row_update(RowState& st, float s, const elem_t* __restrict__ v_row,
                                           int lane) {
    if (s == neg_inf()) return;
    const float m_new = fmaxf(st.m, s);
    const float corr = exp2f(st.m - m_new);
    const float p = exp2f(s - m_new);
    st.l = st.l * corr + p;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c)
        st.acc[c] = st.acc[c] * corr + p * load_ch(v_row, c, lane);
    st.m = m_new;
    st.any = true;
}

/// Dot product of the lane's query channels with a key row, reduced over the warp.
__device__ __forceinline__ float row_dot(const float (&qv)[LANE_D], const elem_t* __restrict__ k_row,
                                         int lane) {
    float d = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) d += qv[c] * load_ch(k_row, c, lane);
    return warp_sum(d);
}

/// Load the lane's channels of a query row.
__device__ __forceinline__ void load_q(float (&qv)[LANE_D], const elem_t* __restrict__ q_row, int lane) {
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) qv[c] = load_ch(q_row, c, lane);
}

/// Write the normalized output row (times sigmoid(gate) when gated) and the row's LSE
/// (natural log, including the sink column; -inf when no key was visible).
__device__ __forceinline__ void row_finish(const RowState& st, elem_t* __restrict__ out_row,
                                           const elem_t* __restrict__ gate_row,
                                           float* __restrict__ lse_slot, int lane) {
    const float inv_l = st.any ? 1.0f / st.l : 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        float o = st.any ? st.acc[c] * inv_l : 0.0f;
{%- if has_gate %}
        const float g = load_ch(gate_row, c, lane);
        o *= 1.0f / (1.0f + expf(-g));
{%- endif %}
        store_ch(out_row, c, lane, o);
    }
{%- if not has_gate %}
    (void)gate_row;
{%- endif %}
{%- if sinks == "none" %}
    if (lane == 0) *lse_slot = st.any ? (st.m + log2f(st.l)) * LN2 : neg_inf();
{%- else %}
    // The sink column keeps even a fully masked row non-empty: LSE = its logit then.
    if (lane == 0) *lse_slot = (st.m + log2f(st.l)) * LN2;
{%- endif %}
}
