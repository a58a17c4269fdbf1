// Kernel `qkv_prep_bf16_hd32_self_nonorm_norope_w4`: q/k/v preparation, rendered from templates/qkv_prep.cu.
// dtype bf16, head dim 32, layout self, q/k norm none,
// rope none over the first 0 channels, output gate false,
// 4 warps per block.
//
// Launch: grid (num_tokens for self, max(num_tokens, num_kv_tokens) for cross), block (4 * 32).
// One block per token, one warp per head vector. Norm and rope run in fp32.
//
// Input qkv: the linear_qkv output (bias already added), elem_t [num_tokens, W] with
//   W = num_groups * (per + 2) * HEAD_DIM, per = num_heads / num_groups.
//   Each group's columns, in order: its per query heads, then key, then value
//   (GQA-interleaved). kv and num_kv_tokens are ignored.
// Outputs: q_out [num_tokens, num_heads, HEAD_DIM], k_out, v_out [num_kv_tokens, num_groups, HEAD_DIM]
//   (self: num_kv_tokens == num_tokens), gate_out [num_tokens, num_heads, HEAD_DIM] (raw gate,
//   the attention kernels apply sigmoid; used only with the output gate).
// Norm weights: elem_t [HEAD_DIM] each (bias only for layer norm); eps: layernorm_epsilon.
// positions: int32 [num_tokens], the rope position of each token; rotary_base; mscale
//   multiplies cos and sin. Unused arguments are ignored (may be null / 0).
// v_nonfinite: int32 flag or null; set to 1 when any value written to v_out is NaN or +-Inf
//   (the attention kernels then take their exact path, see templates/fwd_fast.cu). The
//   caller zeroes it before the launch.

// ---------------------------------------------------------------------------------------
// Element types and conversions. No CUDA toolkit header is included: NVRTC alone compiles
// this file. bf16/f16 are 16-bit payloads; conversions go through bit operations (bf16 ->
// f32) or inline PTX `cvt` (round to nearest even; `cvt.rn.bf16.f32` needs sm_80+).
// ---------------------------------------------------------------------------------------

/// bfloat16 payload (1 sign, 8 exponent, 7 mantissa bits).
struct bf16_t { unsigned short bits; };
/// IEEE binary16 payload.
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float elem_to_float(bf16_t v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}
__device__ __forceinline__ float elem_to_float(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ void float_to_elem(float f, bf16_t* out) {
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    out->bits = b;
}
__device__ __forceinline__ void float_to_elem(float f, f16_t* out) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    out->bits = b;
}

/// The element type of every activation and weight tensor of this kernel (bf16).
typedef bf16_t elem_t;

__device__ __forceinline__ float load_elem(const elem_t* p) { return elem_to_float(*p); }
__device__ __forceinline__ void store_elem(elem_t* p, float f) { float_to_elem(f, p); }

constexpr int WARP_SIZE = 32;
constexpr unsigned int FULL_WARP = 0xffffffffu;
/// Head dim (kv_channels) this kernel is specialized for.
constexpr int HEAD_DIM = 32;
/// Channels held by each lane: channel `c * WARP_SIZE + lane`, `c < LANE_D`.
constexpr int LANE_D = HEAD_DIM / WARP_SIZE;
static_assert(HEAD_DIM % WARP_SIZE == 0, "head dim must be a multiple of the warp size");

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_WARP, x, o);
    return x;
}


constexpr int PREP_WARPS = 4;
/// Rotated channels (head_dim * rotary_percent); 0 = no rope.
constexpr int ROT_DIM = 0;
static_assert(ROT_DIM % 2 == 0 && ROT_DIM <= HEAD_DIM, "rotary dim must be even and <= head dim");

constexpr int KIND_Q = 0;
constexpr int KIND_K = 1;
constexpr int KIND_V = 2;
constexpr int KIND_GATE = 3;

/// Normalize one head vector held across the warp (q/k norm `none`).
__device__ __forceinline__ void qk_normalize(float (&x)[LANE_D], const elem_t* __restrict__ weight,
                                             const elem_t* __restrict__ bias, float eps, int lane) {
    (void)x; (void)weight; (void)bias; (void)eps; (void)lane;
}

extern "C" __global__ void __launch_bounds__(PREP_WARPS * WARP_SIZE) qkv_prep_bf16_hd32_self_nonorm_norope_w4(
    const elem_t* __restrict__ qkv,
    const elem_t* __restrict__ kv,
    elem_t* __restrict__ q_out,
    elem_t* __restrict__ k_out,
    elem_t* __restrict__ v_out,
    elem_t* __restrict__ gate_out,
    const elem_t* __restrict__ q_norm_weight,
    const elem_t* __restrict__ q_norm_bias,
    const elem_t* __restrict__ k_norm_weight,
    const elem_t* __restrict__ k_norm_bias,
    float eps,
    const int* __restrict__ positions,
    float rotary_base,
    float mscale,
    int num_tokens,
    int num_kv_tokens,
    int num_heads,
    int num_groups,
    int* __restrict__ v_nonfinite)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const long long t = blockIdx.x;
    (void)positions; (void)rotary_base; (void)mscale;
    (void)kv; (void)num_kv_tokens;
    const int per = num_heads / num_groups;
    const int gate_heads = 0;
    const long long group_width = (long long)(per * 1 + 2) * HEAD_DIM;
    const long long row_width = group_width * num_groups;
    const int n_vec = num_heads + 2 * num_groups + gate_heads;

    for (int idx = warp; idx < n_vec; idx += PREP_WARPS) {
        int kind, head;
        const elem_t* src;
        elem_t* dst;
        if (t >= num_tokens) break;
        if (idx < num_heads) {
            kind = KIND_Q; head = idx;
            src = qkv + t * row_width + (head / per) * group_width + (long long)(head % per) * HEAD_DIM;
            dst = q_out + (t * num_heads + head) * HEAD_DIM;
        } else if (idx < num_heads + num_groups) {
            kind = KIND_K; head = idx - num_heads;
            src = qkv + t * row_width + head * group_width + (long long)per * 1 * HEAD_DIM;
            dst = k_out + (t * num_groups + head) * HEAD_DIM;
        } else if (idx < num_heads + 2 * num_groups) {
            kind = KIND_V; head = idx - num_heads - num_groups;
            src = qkv + t * row_width + head * group_width + ((long long)per * 1 + 1) * HEAD_DIM;
            dst = v_out + (t * num_groups + head) * HEAD_DIM;
        } else {
            kind = KIND_GATE; head = idx - num_heads - 2 * num_groups;
            src = qkv + t * row_width + (head / per) * group_width + ((long long)per + head % per) * HEAD_DIM;
            dst = gate_out + (t * num_heads + head) * HEAD_DIM;
        }

        float x[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) x[c] = load_elem(src + c * WARP_SIZE + lane);

        if (kind == KIND_Q) qk_normalize(x, q_norm_weight, q_norm_bias, eps, lane);
        else if (kind == KIND_K) qk_normalize(x, k_norm_weight, k_norm_bias, eps, lane);
        bool bad = false;
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            elem_t e;
            float_to_elem(x[c], &e);
            // Non-finite after rounding to elem_t (a large finite f32 can round to Inf).
            bad |= (__float_as_uint(elem_to_float(e)) & 0x7f800000u) == 0x7f800000u;
            dst[c * WARP_SIZE + lane] = e;
        }
        if (kind == KIND_V && v_nonfinite != nullptr && __any_sync(FULL_WARP, bad) && lane == 0)
            atomicOr(v_nonfinite, 1);
    }
}
