// Kernel `{{ key }}`: q/k/v preparation, rendered from templates/qkv_prep.cu.
// dtype {{ dtype }}, head dim {{ head_dim }}, layout {{ layout }}, q/k norm {{ qk_norm }},
// rope {{ rope }} over the first {{ rot_dim }} channels, output gate {{ has_gate }},
// {{ prep_warps }} warps per block.
//
// Launch: grid (num_tokens for self, max(num_tokens, num_kv_tokens) for cross), block ({{ prep_warps }} * 32).
// One block per token, one warp per head vector. Norm and rope run in fp32.
//
{%- if layout == "self" %}
// Input qkv: the linear_qkv output (bias already added), elem_t [num_tokens, W] with
//   W = num_groups * (per{% if has_gate %} * 2{% endif %} + 2) * HEAD_DIM, per = num_heads / num_groups.
//   Each group's columns, in order: its per query heads{% if has_gate %}, its per gate heads{% endif %}, then key, then value
//   (GQA-interleaved). kv and num_kv_tokens are ignored.
{%- else %}
// Input qkv: the linear_q output, elem_t [num_tokens, num_heads * HEAD_DIM].
// Input kv: the linear_kv output, elem_t [num_kv_tokens, num_heads * 2 * HEAD_DIM]; per head
//   [k_h | v_h]. num_groups must equal num_heads.
{%- endif %}
// Outputs: q_out [num_tokens, num_heads, HEAD_DIM], k_out, v_out [num_kv_tokens, num_groups, HEAD_DIM]
//   (self: num_kv_tokens == num_tokens), gate_out [num_tokens, num_heads, HEAD_DIM] (raw gate,
//   the attention kernels apply sigmoid; used only with the output gate).
// Parameters: one `const PrepParams p` (partials/params.cu), fields named
// as below.
// Norm weights: elem_t [HEAD_DIM] each (bias only for layer norm); eps: layernorm_epsilon.
// positions: int32 [num_tokens], the rope position of each token; rotary_base; mscale
//   multiplies cos and sin. Unused arguments are ignored (may be null / 0).
// v_nonfinite: int32 flag or null; set to 1 when any value written to v_out is NaN or +-Inf
//   (the attention kernels then take their exact path, see templates/prefill_sm80.cu). The
//   caller zeroes it before the launch.

{% include "partials/types.cu" %}
{% include "partials/params.cu" %}

constexpr int PREP_WARPS = {{ prep_warps }};
/// Rotated channels (head_dim * rotary_percent); 0 = no rope.
constexpr int ROT_DIM = {{ rot_dim }};
static_assert(ROT_DIM % 2 == 0 && ROT_DIM <= HEAD_DIM, "rotary dim must be even and <= head dim");

constexpr int KIND_Q = 0;
constexpr int KIND_K = 1;
constexpr int KIND_V = 2;
{%- if layout == "self" %}
constexpr int KIND_GATE = 3;
{%- endif %}

/// Normalize one head vector held across the warp (q/k norm `{{ qk_norm }}`).
__device__ __forceinline__ void qk_normalize(float (&x)[LANE_D], const elem_t* __restrict__ weight,
                                             const elem_t* __restrict__ bias, float eps, int lane) {
{%- if qk_norm == "layer" %}
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) s += x[c];
    const float mean = warp_sum(s) / HEAD_DIM;
    float s2 = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c)
        if (ch_ok(c, lane)) s2 += (x[c] - mean) * (x[c] - mean);
    const float r = rsqrtf(warp_sum(s2) / HEAD_DIM + eps);
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) x[c] = (x[c] - mean) * r * load_ch(weight, c, lane) + load_ch(bias, c, lane);
{%- elif qk_norm == "rms" or qk_norm == "l2" %}
    float s2 = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) s2 += x[c] * x[c];
    const float r = rsqrtf(warp_sum(s2) / HEAD_DIM + eps);
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
{%- if qk_norm == "rms" %}
        x[c] = x[c] * r * load_ch(weight, c, lane);
{%- else %}
        x[c] = x[c] * r;
{%- endif %}
    }
{%- if qk_norm == "l2" %}
    (void)weight;
{%- endif %}
    (void)bias;
{%- else %}
    (void)x; (void)weight; (void)bias; (void)eps; (void)lane;
{%- endif %}
}

extern "C" __global__ void __launch_bounds__(PREP_WARPS * WARP_SIZE) {{ key }}(const PrepParams p)
{
    const elem_t* __restrict__ qkv = p.qkv;
    elem_t* __restrict__ q_out = p.q_out;
    elem_t* __restrict__ k_out = p.k_out;
    elem_t* __restrict__ v_out = p.v_out;
    const float eps = p.eps;
    const int num_tokens = p.num_tokens, num_heads = p.num_heads;
{%- if layout == "self" %}
    const int num_groups = p.num_groups;
    elem_t* __restrict__ gate_out = p.gate_out;
{%- else %}
    const elem_t* __restrict__ kv = p.kv;
    const int num_kv_tokens = p.num_kv_tokens;
{%- endif %}
{%- if rope != "none" %}
    const float rotary_base = p.rotary_base, mscale = p.mscale;
{%- endif %}
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const long long t = blockIdx.x;
{%- if rope != "none" %}
    __shared__ float stage[PREP_WARPS][HEAD_DIM];
    const float pos = t < num_tokens ? (float)p.positions[t] : 0.0f;
{%- endif %}
{%- if layout == "self" %}
    const int per = num_heads / num_groups;
    const int gate_heads = {% if has_gate %}num_heads{% else %}0{% endif %};
    const long long group_width = (long long)(per * {% if has_gate %}2{% else %}1{% endif %} + 2) * HEAD_DIM;
    const long long row_width = group_width * num_groups;
    const int n_vec = num_heads + 2 * num_groups + gate_heads;
{%- else %}
    const int n_vec = 3 * num_heads;
{%- endif %}

    for (int idx = warp; idx < n_vec; idx += PREP_WARPS) {
        int kind, head;
        const elem_t* src;
        elem_t* dst;
{%- if layout == "self" %}
        if (t >= num_tokens) break;
        if (idx < num_heads) {
            kind = KIND_Q; head = idx;
            src = qkv + t * row_width + (head / per) * group_width + (long long)(head % per) * HEAD_DIM;
            dst = q_out + (t * num_heads + head) * HEAD_DIM;
        } else if (idx < num_heads + num_groups) {
            kind = KIND_K; head = idx - num_heads;
            src = qkv + t * row_width + head * group_width + (long long)per * {% if has_gate %}2{% else %}1{% endif %} * HEAD_DIM;
            dst = k_out + (t * num_groups + head) * HEAD_DIM;
        } else if (idx < num_heads + 2 * num_groups) {
            kind = KIND_V; head = idx - num_heads - num_groups;
            src = qkv + t * row_width + head * group_width + ((long long)per * {% if has_gate %}2{% else %}1{% endif %} + 1) * HEAD_DIM;
            dst = v_out + (t * num_groups + head) * HEAD_DIM;
        } else {
            kind = KIND_GATE; head = idx - num_heads - 2 * num_groups;
            src = qkv + t * row_width + (head / per) * group_width + ((long long)per + head % per) * HEAD_DIM;
            dst = gate_out + (t * num_heads + head) * HEAD_DIM;
        }
{%- else %}
        if (idx < num_heads) {
            if (t >= num_tokens) continue;
            kind = KIND_Q; head = idx;
            src = qkv + (t * num_heads + head) * HEAD_DIM;
            dst = q_out + (t * num_heads + head) * HEAD_DIM;
        } else {
            if (t >= num_kv_tokens) continue;
            const bool is_k = idx < 2 * num_heads;
            kind = is_k ? KIND_K : KIND_V;
            head = idx - (is_k ? num_heads : 2 * num_heads);
            src = kv + (t * num_heads + head) * 2 * HEAD_DIM + (is_k ? 0 : HEAD_DIM);
            dst = (is_k ? k_out : v_out) + (t * num_heads + head) * HEAD_DIM;
        }
{%- endif %}

        float x[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) x[c] = load_ch(src, c, lane);

        if (kind == KIND_Q) qk_normalize(x, p.q_norm_weight, p.q_norm_bias, eps, lane);
        else if (kind == KIND_K) qk_normalize(x, p.k_norm_weight, p.k_norm_bias, eps, lane);
{%- if rope != "none" %}
        if (kind == KIND_Q || kind == KIND_K) {
#pragma unroll
            for (int c = 0; c < LANE_D; ++c)
                if (ch_ok(c, lane)) stage[warp][c * WARP_SIZE + lane] = x[c];
            __syncwarp();
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) {
                const int d = c * WARP_SIZE + lane;
                if (d < ROT_DIM) {
{%- if rope == "half" %}
                    // out = t cos + rotate_half(t) sin, rotate_half(t) = cat(-t2, t1)
                    const int half = ROT_DIM / 2;
                    const int f = d < half ? d : d - half;
                    const int partner = d < half ? d + half : d - half;
                    const float sign = d < half ? -1.0f : 1.0f;
{%- else %}
                    // adjacent pairs: (t0, t1) -> (t0 cos - t1 sin, t1 cos + t0 sin)
                    const int f = d / 2;
                    const int partner = d ^ 1;
                    const float sign = (d & 1) ? 1.0f : -1.0f;
{%- endif %}
                    const float inv_freq = 1.0f / powf(rotary_base, (float)(2 * f) / (float)ROT_DIM);
                    float sn, cs;
                    sincosf(pos * inv_freq, &sn, &cs);
                    x[c] = x[c] * (cs * mscale) + sign * stage[warp][partner] * (sn * mscale);
                }
            }
            __syncwarp();
        }
{%- endif %}
        bool bad = false;
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            if (!ch_ok(c, lane)) continue;
            elem_t e;
            float_to_elem(x[c], &e);
            // Non-finite after rounding to elem_t (a large finite f32 can round to Inf).
            bad |= (__float_as_uint(elem_to_float(e)) & 0x7f800000u) == 0x7f800000u;
            dst[c * WARP_SIZE + lane] = e;
        }
        if (kind == KIND_V && p.v_nonfinite != nullptr && __any_sync(FULL_WARP, bad) && lane == 0)
            atomicOr(p.v_nonfinite, 1);
    }
}
