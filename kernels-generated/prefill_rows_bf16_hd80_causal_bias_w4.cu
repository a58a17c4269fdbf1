// Kernel `prefill_rows_bf16_hd80_causal_bias_w4`: attention forward (prefill/training), rendered from templates/prefill_rows.cu.
// dtype bf16, head dim 80, mask causal, window false,
// sinks none, bias true, output gate false, 4 query rows per block.
//
// Launch: grid (ceil(max_seqlen_q / 4), num_heads, batch), block (4 * 32).
// One warp per (query row, head, sequence). GQA by indexing: head h reads group
// h / (num_heads / num_groups); K/V are never repeated.
//
// Layouts (row-major, elements of elem_t unless stated):
//   padded (cu_seqlens_q == nullptr): q, out, gate [seqlen_q, batch, num_heads, HEAD_DIM];
//                                    k, v [seqlen_k, batch, num_groups, HEAD_DIM]
//   packed (cu_seqlens_q, cu_seqlens_k int32 [batch + 1], both given):
//                                    q, out, gate [total_q, num_heads, HEAD_DIM];
//                                    k, v [total_k, num_groups, HEAD_DIM]
//   lse: f32 [num_heads, rows], rows = seqlen_q * batch (padded, row = i * batch + b) or
//        total_q (packed, row = token index).
//   mask (padding/arbitrary masks): uint8, nonzero = masked out, element (b, h, i, j) at
//        b * mask_stride_b + h * mask_stride_h + i * mask_stride_q + j * mask_stride_k
//        (stride 0 broadcasts; i, j are positions within the sequence).
//   bias: f32 additive post-scale bias, element (b, h, i, j) at the same kind of strides.
//   sinks: f32 [num_heads] learned sink logits (learnable sinks only).
// Parameters: one `const FwdParams p` (partials/params.cu), fields q, k, v,
// out, lse, cu_seqlens_q, cu_seqlens_k, batch, num_heads, num_groups, seqlen_q, seqlen_k,
// softmax_scale, window_left, window_right, mask + strides, bias + strides, sinks, gate; the
// others (max_logit .. max_blocks_per_seq) are ignored, as are fields a variant does not use
// (null / 0).

// ---------------------------------------------------------------------------------------
// The opening of the one-warp-per-row kernels (prefill_rows.cu, decode_rows.cu,
// decode_rows_paged.cu): the partials they use, BLOCK_ROWS (query rows, one warp each, per
// block) and the kernel's signature (one `const FwdParams p`) up to the body's brace.
// ---------------------------------------------------------------------------------------
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
constexpr int HEAD_DIM = 80;
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
// Mask predicate. Generated part: causal mode `top_left`, window false.
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
    hi_ = min(hi_, (long long)i + 1);
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
    constexpr unsigned EXP2 = 0x7F807F80u;
    // x has a zero 16-bit half exactly where an element's exponent is all ones.
    const unsigned a = (w.x & EXP2) ^ EXP2, b = (w.y & EXP2) ^ EXP2;
    const unsigned c = (w.z & EXP2) ^ EXP2, d = (w.w & EXP2) ^ EXP2;
    const unsigned z = ((a - 0x00010001u) & ~a) | ((b - 0x00010001u) & ~b) |
                       ((c - 0x00010001u) & ~c) | ((d - 0x00010001u) & ~d);
    return (z & 0x80008000u) != 0u;
}

// ---------------------------------------------------------------------------------------
// One warp computes one query row against keys [lo, hi) of its K/V group: online softmax in
// fp32, base-2 exponentials with softmax_scale * log2(e) folded into the logits.
// Sinks: `none`. A row with no visible key gives zeros and LSE -inf.
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
    (void)sinks; (void)head;
    st.m = neg_inf();
    st.l = 0.0f;
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
        store_ch(out_row, c, lane, o);
    }
    (void)gate_row;
    if (lane == 0) *lse_slot = st.any ? (st.m + log2f(st.l)) * LN2 : neg_inf();
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


constexpr int BLOCK_ROWS = 4;

extern "C" __global__ void __launch_bounds__(BLOCK_ROWS * WARP_SIZE) prefill_rows_bf16_hd80_causal_bias_w4(const FwdParams p)
{

    const elem_t* __restrict__ q = p.q;
    const elem_t* __restrict__ k = p.k;
    const elem_t* __restrict__ v = p.v;
    const int* __restrict__ cu_seqlens_q = p.cu_seqlens_q;
    const int* __restrict__ cu_seqlens_k = p.cu_seqlens_k;
    const int batch = p.batch, num_heads = p.num_heads, num_groups = p.num_groups;
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int i = blockIdx.x * BLOCK_ROWS + warp;
    const int g = h / (num_heads / num_groups);
    const bool packed = cu_seqlens_q != nullptr;

    int sq, sk;
    long long q_tok, k_base, k_step, total_q;
    if (packed) {
        const int q0 = cu_seqlens_q[b];
        const int k0 = cu_seqlens_k[b];
        sq = cu_seqlens_q[b + 1] - q0;
        sk = cu_seqlens_k[b + 1] - k0;
        q_tok = (long long)q0 + i;
        k_base = k0;
        k_step = 1;
        total_q = cu_seqlens_q[batch];
    } else {
        sq = p.seqlen_q;
        sk = p.seqlen_k;
        q_tok = (long long)i * batch + b;
        k_base = b;
        k_step = batch;
        total_q = (long long)p.seqlen_q * batch;
    }
    if (i >= sq) return;

    const long long q_off = (q_tok * num_heads + h) * HEAD_DIM;
    float qv[LANE_D];
    load_q(qv, q + q_off, lane);

    int lo, hi;
    visible_range(i, sq, sk, p.window_left, p.window_right, &lo, &hi);
    const float scale_log2 = p.softmax_scale * LOG2E;

    RowState st;
    row_init(st, p.sinks, h);
    for (int j = lo; j < hi; ++j) {
        const long long kv_off = ((k_base + (long long)j * k_step) * num_groups + g) * HEAD_DIM;
        // A -inf bias skips the key (row_update); a finite one stays finite (biased_logit_log2).
        const float bj = p.bias[b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_q + j * p.bias_stride_k];
        if (bj == neg_inf()) continue;
        const float s = biased_logit_log2(row_dot(qv, k + kv_off, lane) * p.softmax_scale, bj);
        (void)scale_log2;
        row_update(st, s, v + kv_off, lane);
    }
    row_finish(st, p.out + q_off, p.gate + q_off, p.lse + (long long)h * total_q + q_tok, lane);
}
