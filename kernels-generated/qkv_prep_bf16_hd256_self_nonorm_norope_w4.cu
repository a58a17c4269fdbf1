// Kernel `qkv_prep_bf16_hd256_self_nonorm_norope_w4`: q/k/v preparation, rendered from templates/qkv_prep.cu.
// dtype bf16, head dim 256, layout self, q/k norm none,
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
// Parameters: one `const PrepParams p` (partials/params.cu), fields named
// as below.
// Norm weights: elem_t [HEAD_DIM] each (bias only for layer norm); eps: layernorm_epsilon.
// positions: int32 [num_tokens], the rope position of each token; rotary_base; mscale
//   multiplies cos and sin. Unused arguments are ignored (may be null / 0).
// v_nonfinite: int32 flag or null; set to 1 when any value written to v_out is NaN or +-Inf
//   (the attention kernels then take their exact path, see templates/prefill_sm80.cu). The
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
constexpr int HEAD_DIM = 256;
/// Channels held by each lane: channel `c * WARP_SIZE + lane`, `c < LANE_D`. A head dim that
/// is not a multiple of the warp size (80) pads the last chunk: its lanes past HEAD_DIM hold
/// channels that do not exist, which load_ch reads as zero and store_ch never writes (so sums
/// over the lanes and dot products stay exact). At a multiple of the warp size ch_ok is the
/// constant true and the checks compile away.
constexpr int LANE_D = (HEAD_DIM + WARP_SIZE - 1) / WARP_SIZE;
static_assert(HEAD_DIM % 16 == 0, "head dim must be a multiple of 16");
static_assert((LANE_D - 1) * WARP_SIZE < HEAD_DIM && LANE_D * WARP_SIZE >= HEAD_DIM, "LANE_D chunks cover the head dim");

/// Whether the lane's channel `c * WARP_SIZE + lane` exists.
__device__ __forceinline__ bool ch_ok(int c, int lane) {
    return HEAD_DIM % WARP_SIZE == 0 || c * WARP_SIZE + lane < HEAD_DIM;
}
/// The lane's channel `c` of a row (zero past HEAD_DIM, never read there).
__device__ __forceinline__ float load_ch(const elem_t* __restrict__ row, int c, int lane) {
    return ch_ok(c, lane) ? load_elem(row + c * WARP_SIZE + lane) : 0.0f;
}
/// Store the lane's channel `c` of a row (nothing past HEAD_DIM).
__device__ __forceinline__ void store_ch(elem_t* row, int c, int lane, float f) {
    if (ch_ok(c, lane)) store_elem(row + c * WARP_SIZE + lane, f);
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_WARP, x, o);
    return x;
}

// ---------------------------------------------------------------------------------------
// Kernel parameter structs, one per kernel family: the host fills one typed struct per
// launch and queues it as the kernel's whole parameter buffer. Kernels take it by value
// (`const FwdParams p`; never take its address, which would copy it to local memory), except
// `prefill_sm80`, which declares the same fields positionally in the same order (the struct
// parameter costs its hot variants spills) and so has the same parameter buffer. The host's
// `#[repr(C)]` twins live in attention-runtime/src/cuda/params.rs with the same fields in the
// same order; attention-runtime/tests/nvrtc_params_layout.rs compiles static_asserts of
// every field's offset and size (taken from the Rust side) against these declarations, and
// tests/nvrtc_catalog.rs checks every compiled kernel's parameter table, with NVRTC alone.
// Pointers are 8 bytes (null = absent), int and float 4, long long 8.
// ---------------------------------------------------------------------------------------

/// Attention over q, k, v: the prefill family (`prefill_rows`, `prefill_sm80` with its
/// static-cache and paged modes) and the one-warp-per-row cache kernels (`decode_rows`,
/// `decode_rows_paged`). Each kernel documents which fields it reads; the others may be
/// null / 0.
struct FwdParams {
    const elem_t* q;               // queries (layout per kernel)
    const elem_t* k;               // keys: packed/padded k, a static cache layer or a pool
    const elem_t* v;               // values, as k
    elem_t* out;                   // output, layout of q
    float* lse;                    // f32 [num_heads, rows], natural log
    const int* cu_seqlens_q;       // int32 [batch + 1] (packed / paged) or null (padded)
    const int* cu_seqlens_k;       // int32 [batch + 1] (packed) or null
    int batch;                     // sequences (requests)
    int num_heads;                 // query heads
    int num_groups;                // K/V groups (divides num_heads)
    int seqlen_q;                  // padded query length; packed: the longest
    int seqlen_k;                  // padded key length; packed: the longest
    float softmax_scale;           // logit scale
    int window_left;               // sliding window, -1 = unbounded
    int window_right;
    const unsigned char* mask;     // uint8 [b, h, i, j] at the strides below, nonzero = masked
    long long mask_stride_b;
    long long mask_stride_h;
    long long mask_stride_q;
    long long mask_stride_k;
    const float* bias;             // f32 additive post-scale bias at the strides below
    long long bias_stride_b;
    long long bias_stride_h;
    long long bias_stride_q;
    long long bias_stride_k;
    const float* sinks;            // f32 [num_heads] learnable sink logits
    const elem_t* gate;            // output gate, layout of q
    float* max_logit;              // f32 [num_heads] per-head max logit record, or null
    const int* v_nonfinite;        // int32 flag: some V element is not finite, or null
    const int* cache_seqlens_k;    // int32 [batch]: keys per sequence (static cache / pool)
    int cache_batch_offset;        // static cache: first batch slot
    int cache_max_batch;           // static cache: batch slots of the layer
    const int* block_table;        // int32 [batch, max_blocks_per_seq] (paged pool)
    int block_size;                // pool rows per block (a power of two >= 16)
    int max_blocks_per_seq;        // block table row stride
};

/// The `qkv_prep` kernel: split of the projections into q, k, v (and the gate), q/k norm,
/// rope at explicit positions (templates/qkv_prep.cu).
struct PrepParams {
    const elem_t* qkv;             // linear_qkv (self) or linear_q (cross) output
    const elem_t* kv;              // linear_kv output (cross), or null
    elem_t* q_out;                 // [num_tokens, num_heads, HEAD_DIM]
    elem_t* k_out;                 // [num_kv_tokens, num_groups, HEAD_DIM]
    elem_t* v_out;
    elem_t* gate_out;              // [num_tokens, num_heads, HEAD_DIM] (output gate), or null
    const elem_t* q_norm_weight;   // [HEAD_DIM] each, or null
    const elem_t* q_norm_bias;
    const elem_t* k_norm_weight;
    const elem_t* k_norm_bias;
    float eps;                     // norm epsilon
    const int* positions;          // int32 [num_tokens] rope positions, or null
    float rotary_base;
    float mscale;                  // multiplies cos and sin
    int num_tokens;
    int num_kv_tokens;
    int num_heads;
    int num_groups;
    int* v_nonfinite;              // int32 flag raised when a written v is not finite, or null
};

/// The `append_kv` kernel: new k/v rows into a paged pool or a static cache
/// (templates/append_kv.cu).
struct AppendParams {
    const elem_t* k;               // [total_tokens, num_groups, HEAD_DIM]
    const elem_t* v;
    elem_t* k_dst;                 // pool [num_blocks, block_size, ...] or cache layer
    elem_t* v_dst;
    const int* cu_seqlens_q;       // int32 [batch + 1], or null (padded [s, batch] rows)
    const int* seqlens_k;          // int32 [batch]: keys after the append
    const int* block_table;        // int32 [batch, max_blocks_per_seq], or null (static)
    int batch;
    int num_groups;
    int block_size;
    int max_blocks_per_seq;
    int cache_batch_offset;        // static cache: first batch slot
    int cache_max_batch;           // static cache: batch slots
};

/// The paged mode of `decode_splitkv` (split and combine entries): the decode rows of a paged
/// mixed batch over the pool (templates/decode_splitkv.cu).
struct PagedDecodeParams {
    const elem_t* q;               // packed [total_q, num_heads, HEAD_DIM], already rotated
    const elem_t* k_pool;          // [num_blocks, block_size, num_groups, HEAD_DIM]
    const elem_t* v_pool;
    float* o_part;                 // f32 [num_splits, merge_rows, num_heads, HEAD_DIM]
    float* lse_part;               // f32 [num_splits, merge_rows, num_heads] (log2 units)
    elem_t* out;                   // packed, layout of q (the decode rows are written)
    float* lse;                    // f32 [num_heads, total_q] (natural log)
    const float* sinks;            // f32 [num_heads] learnable sink logits
    const elem_t* gate;            // output gate, layout of q
    const int* requests;           // int32 [batch]: the decode requests' indices in the batch
    const int* cu_seqlens_q;       // int32 [num_requests + 1] of the whole batch
    const int* seqlens_k;          // int32 [num_requests]: keys per request (new ones included)
    const int* block_table;        // int32 [num_requests, max_blocks_per_seq]
    const int* row_starts;         // int32 [batch + 1]: decode request b's query rows are merge rows row_starts[b] ..
    const int* row_tokens;         // int32 [merge_rows]: each merge row's packed token
    int batch;                     // decode requests (grid z of the split kernel)
    int merge_rows;                // their query rows, sum of q_len (grid x of the merge)
    int num_heads;
    int num_groups;
    int num_splits;
    int total_q;                   // rows of q (the lse stride)
    int block_size;                // a power of two >= 16
    int max_blocks_per_seq;
    float softmax_scale;
    int window_left;               // -1 = unbounded
    int window_right;
};


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

extern "C" __global__ void __launch_bounds__(PREP_WARPS * WARP_SIZE) qkv_prep_bf16_hd256_self_nonorm_norope_w4(const PrepParams p)
{
    const elem_t* __restrict__ qkv = p.qkv;
    elem_t* __restrict__ q_out = p.q_out;
    elem_t* __restrict__ k_out = p.k_out;
    elem_t* __restrict__ v_out = p.v_out;
    const float eps = p.eps;
    const int num_tokens = p.num_tokens, num_heads = p.num_heads;
    const int num_groups = p.num_groups;
    elem_t* __restrict__ gate_out = p.gate_out;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const long long t = blockIdx.x;
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
        for (int c = 0; c < LANE_D; ++c) x[c] = load_ch(src, c, lane);

        if (kind == KIND_Q) qk_normalize(x, p.q_norm_weight, p.q_norm_bias, eps, lane);
        else if (kind == KIND_K) qk_normalize(x, p.k_norm_weight, p.k_norm_bias, eps, lane);
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
