// Kernel `decode_splitkv_bf16_hd80_norope_paged_w4`: one decode step of T = num_tokens new tokens per sequence (1 to 16: plain,
// speculative or multi-token-prediction decode) over a static KV cache (flash-decoding),
// rendered from templates/decode_splitkv.cu. dtype bf16, head dim 80, causal
// bottom_right, window false, rope none over 0 channels,
// 64 keys per tile, 3-stage cp.async ring, 4 warps per
// block, 1 row block(s) of 16 query rows per pass.
//
// `decode_splitkv_bf16_hd80_norope_paged_w4` (split kernel), one block of WARPS warps per (split, group, sequence): for sequence
// b whose new tokens sit at positions pos .. pos + T - 1 (pos = cache_seqlens[b]) it
//   0. copies its small inputs into shared memory first (the first pass's query rows; the new
//      k/v rows it appends and the rope rows at pos .. pos + T - 1), then issues the copies
//      of its first STAGES - 1 K/V tiles (below), so that their latency runs under step 1 and
//      the query rotation,
//   1. rotates each new k with the cos/sin tables at its position and appends it and its v at
//      that cache row (one warp per row, only in the block whose split owns the row; only that
//      block reads the row, after a barrier; a row inside the tiles of step 0 is written into
//      the ring as well, as step 0 skipped it),
//   2. attends over keys [s_lo, s_hi) of its split of the union of the tokens' visible ranges
//      (token t: [0, pos + t + 1), bottom-right causal, window) on tensor cores. The step's
//      rows are token t's query heads of the group, row t * per + head (q rotated at
//      pos + t); PASS_ROWS = 16 * ROW_BLOCKS of them at a time are the rows of m16 A operands
//      in shared memory (zero rows past the step's rows; more rows take more passes). K/V
//      tiles of TILE keys stream through a STAGES-deep ring of 16-byte cp.async copies (rows
//      padded to HEAD_DIM + 8 elements so ldmatrix phases hit distinct banks; each K/V element
//      read once per pass, so once per step up to PASS_ROWS rows); warp w serves row block
//      w / WPR and keys [KW (w % WPR), KW (w % WPR + 1)) of every tile: S = Q K^T and
//      O += P V with mma.sync m16n8k16 (bf16 in, f32 accumulate, P rounded to
//      bf16), each score masked to its row's token's range, online softmax in exp2 per
//      warp; the row block's warps' (m, l, O) are merged through shared memory at the end,
//   and writes the split's normalized partial output and its LSE (log2 units, -inf = no key).
// `decode_splitkv_bf16_hd80_norope_paged_w4_combine`: one block of MERGE_WARPS warps per (token row, head) merges the splits
// by their LSEs in one pass: each warp loads MERGE_BATCH of its splits at once and keeps a
// running max, so a merge of up to MERGE_WARPS * MERGE_BATCH splits is one round of loads; then
// it adds the sink column, applies the output gate and writes out and lse.
//
// Launch: split kernel grid (num_splits, num_groups, batch), block WARPS * 32, dynamic shared
//         memory (STAGES * 2 * TILE + PASS_ROWS) * (HEAD_DIM + 8) * sizeof(elem_t) bytes;
//         combine kernel grid (T * batch, num_heads), block MERGE_WARPS * 32, its `batch`
//         argument T * batch.
//
// Layouts (row-major):
//   q, out, gate: elem_t [T, batch, num_heads, HEAD_DIM]   (q not yet rotated)
//   k_new, v_new: elem_t [T, batch, num_groups, HEAD_DIM]  (k not yet rotated)
//   k_cache, v_cache: elem_t [max_seq, max_batch, num_groups, HEAD_DIM], 16-byte aligned;
//       sequence b at batch slot batch_offset + b; offsets are 64-bit.
//   cache_seqlens: int32 [batch]; rope_cos, rope_sin: f32 [rope_rows, ROT_DIM / 2]
//   o_part: f32 [num_splits, T, batch, num_heads, HEAD_DIM]; lse_part: f32 [num_splits, T, batch, num_heads]
//   lse: f32 [num_heads, T * batch] (natural log); sinks: f32 [num_heads] (learnable sinks only)
//
// Paged mode (true; `_paged` keys, no rope): the decode requests (1 to 16 new tokens
// each) of a paged mixed batch, after qkv_prep rotated q/k and append_kv wrote the new k/v into
// the pool. Both entries take one `const PagedDecodeParams p` (partials/params.cu). Block b of
// the split kernel serves decode request req = p.requests[b] of the batch: its T = q_len query
// tokens are packed tokens cu_seqlens_q[req] .. of q [total_q, num_heads, HEAD_DIM]; token t
// attends to keys [0, seqlens_k[req] - T + t + 1) (bottom-right causal, window) read from the
// pools [num_blocks, block_size, num_groups, HEAD_DIM] through block_table[req, j / block_size]
// (block_size a power of two; tiles straddle blocks; 64-bit offsets); nothing is rotated or
// appended. o_part / lse_part rows are merge rows ([num_splits, merge_rows, ...]; request b's
// tokens are rows row_starts[b] ..); the merge (grid (merge_rows, num_heads)) writes out and
// gate at row_tokens[row] and lse [num_heads, total_q] at (h, token). Keys past seqlens_k,
// other requests' blocks and unused pool blocks are never read.

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
// Mask predicate. Generated part: causal mode `bottom_right`, window false.
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
    hi_ = min(hi_, (long long)i + sk - sq + 1);
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


constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
/// Warps per block of the split kernel.
constexpr int WARPS = 4;
/// Blocks per SM promised to ptxas: those the shared memory of a Hopper SM holds (render.rs
/// `decode_splitkv_min_blocks`), so the register budget matches the reachable occupancy.
constexpr int MIN_BLOCKS = 2;
/// Keys per shared-memory tile.
constexpr int TILE = 64;
/// Depth of the cp.async ring (tiles in flight while one is consumed: STAGES - 1).
constexpr int STAGES = 3;
/// Query rows per MMA row block (the m of m16n8k16).
constexpr int MROWS = 16;
/// Row blocks attended together per pass over the keys: PASS_ROWS query rows share every K/V
/// tile load. Warp w serves row block w / WPR and keys [KW (w % WPR), KW (w % WPR + 1)) of
/// every tile (ROW_BLOCKS 1: four warps of 16 keys; 2: two warps of 32 keys per row block;
/// 4: eight warps, two of 32 keys per row block).
constexpr int ROW_BLOCKS = 1;
constexpr int PASS_ROWS = MROWS * ROW_BLOCKS;
constexpr int WPR = WARPS / ROW_BLOCKS;
constexpr int KW = TILE / WPR;
/// k16 key blocks of a warp's keys of one tile.
constexpr int KB = KW / 16;
/// Shared-memory row of K, V and Q tiles, in elements (8 of padding).
constexpr int SROW = HEAD_DIM + 8;
/// 16-byte chunks per K/V row.
constexpr int CHUNKS = HEAD_DIM / 8;
/// n8 tiles of one output row block; k16 steps of one q.k.
constexpr int NT = HEAD_DIM / 8;
constexpr int KSTEPS = HEAD_DIM / 16;
static_assert(WARPS % ROW_BLOCKS == 0 && TILE % WPR == 0 && KW % 16 == 0,
              "the warps of a row block split a tile into k16 key blocks");
static_assert(WARPS * MROWS * HEAD_DIM * 4 <= STAGES * 2 * TILE * SROW * 2,
              "the warps' partial outputs fit in the ring");
static_assert(HEAD_DIM % 16 == 0, "head dim must be a multiple of 16");
static_assert(STAGES >= 3, "ring slot STAGES - 1 stages the step's inputs while the first tiles load");
// ---------------------------------------------------------------------------------------
// cp.async helpers (sm_80+) of the tensor-core kernels (prefill_sm80.cu, prefill_sm90.cu,
// decode_splitkv.cu, the backward kernels): the shared-space address of a pointer, the
// 16-byte global -> shared copy, commit and wait. The copy zero-fills when `valid` is false;
// a template that sets `cp_async_always = true` before the include gets instead the form
// without that operand (every copy whole: decode_splitkv.cu).
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
/// 16-byte async copy global -> shared, always all 16 bytes.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---------------------------------------------------------------------------------------
// sm_80 tensor-core helpers (prefill_sm80.cu, decode_splitkv.cu, the backward kernels):
// ldmatrix and mma.sync m16n8k16 with f32 accumulate. Fragment layouts (PTX ISA, m16n8k16):
// A (16x16, row): a0 = (row g, cols 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 8+2t..),
// a3 = (g+8, 8+2t..); B (16x8, col): b0 = (k 2t..2t+1, col g), b1 = (k 8+2t.., g);
// C (16x8): c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..); g = lane / 4, t = lane % 4.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 { %0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 { %0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

/// d += a (16x16, row) * b (16x8, col), f32 accumulate.
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------
// f32 -> bf16 pair packing and ex2.approx, shared by the tensor-core kernels
// (prefill_sm80.cu, prefill_sm90.cu, decode_splitkv.cu, the backward kernels); a template
// that sets `pack_only = true` before the include gets pack2 alone (decode_splitkv.cu).
// ---------------------------------------------------------------------------------------

/// Two floats -> packed pair of elem_t (`lo` in the low half), round to nearest even.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}


/// 4-byte async copy global -> shared (the rope rows' staging; their rows need not be
/// 16-byte aligned).
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

/// Programmatic dependent launch (PTX `griddepcontrol`, sm_90+; no-ops before): allow the
/// next kernel on the stream to be scheduled / wait until the previous one has completed and
/// its memory operations are visible (returns at once when not launched as a dependent).
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_WARP, x, o));
    return x;
}
extern "C" __global__ void __launch_bounds__(WARPS * WARP_SIZE, MIN_BLOCKS) decode_splitkv_bf16_hd80_norope_paged_w4(const PagedDecodeParams p)
{
    const elem_t* __restrict__ q = p.q;
    float* __restrict__ o_part = p.o_part;
    float* __restrict__ lse_part = p.lse_part;
    const int num_heads = p.num_heads, num_groups = p.num_groups;
    const int num_splits = p.num_splits;
    const float softmax_scale = p.softmax_scale;
    const int window_left = p.window_left, window_right = p.window_right;
    // Ring of STAGES x {K, V} tiles, each elem_t [TILE][SROW], then the pass's query rows
    // q_s, elem_t [PASS_ROWS][SROW]; after the last tile of a pass the ring holds the warps'
    // partial outputs, f32 [WARPS][MROWS][HEAD_DIM].
    extern __shared__ __align__(16) unsigned char kv_ring[];
    elem_t* ring = reinterpret_cast<elem_t*>(kv_ring);
    elem_t* q_s = ring + STAGES * 2 * TILE * SROW;
    __shared__ float ml_s[WARPS][MROWS][2];

    const int tid = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int split = blockIdx.x;
    const int g = blockIdx.y;
    const int b = blockIdx.z;
    const int per = num_heads / num_groups;
    // Decode request p.requests[b] of the paged batch: its num_tokens (already rotated) query
    // rows are tokens cu_seqlens_q[req] ..; its keys 0 .. seqlens_k[req] (the new ones already
    // appended) live in pool blocks block_table[req, j / block_size], rows j % block_size.
    const int req = p.requests[b];
    const int sk = p.seqlens_k[req];
    const long long tok = p.cu_seqlens_q[req];
    const int num_tokens = p.cu_seqlens_q[req + 1] - (int)tok;
    // Token t's merge row (the o_part / lse_part row) is rows_at + t * rows_step of merge_rows.
    const int rows_at = p.row_starts[b], rows_step = 1, merge_rows = p.merge_rows;
    const int* __restrict__ bt_row = p.block_table + (long long)req * p.max_blocks_per_seq;
    const int bs_shift = __ffs(p.block_size) - 1;  // block_size is a power of two
    const int bs_mask = p.block_size - 1;
    const elem_t* __restrict__ k_pool = p.k_pool + (long long)g * HEAD_DIM;
    const elem_t* __restrict__ v_pool = p.v_pool + (long long)g * HEAD_DIM;
    const long long pool_row = (long long)num_groups * HEAD_DIM;  // elements per pool row

    // Keys of the union of the tokens' visible ranges (bottom-right causal, window: both ends
    // grow with the token), split into num_splits chunks.
    int lo, hi, unused;
    visible_range(0, num_tokens, sk, window_left, window_right, &lo, &unused);
    visible_range(num_tokens - 1, num_tokens, sk, window_left, window_right, &unused, &hi);
    const int chunk = (hi - lo + num_splits - 1) / num_splits;
    const int s_lo = min(hi, lo + split * chunk);
    const int s_hi = min(hi, s_lo + chunk);
    // 2. (set up here) Attention over [s_lo, s_hi).
    const int n_tiles = (s_hi - s_lo + TILE - 1) / TILE;
    // First row the step appends (the early prefetch leaves rows from it to the append).
    const long long new_lo = 0x7fffffffffffffffll;  // nothing is appended
    // Queue tile t's copies into ring slot t % STAGES (rows past the range zeroed) and commit
    // a group (an empty one past the last tile, so the wait counts stay uniform). `early`:
    // the prefetch issued before the append, which leaves the step's new rows (j >= pos, not
    // in the cache yet) to the append, which writes them into the ring as well.
    auto load_tile = [&](int t, bool early) {
        if (t < n_tiles) {
            const int t0 = s_lo + t * TILE;
            const int n = min(TILE, s_hi - t0);
            elem_t* ks = ring + (t % STAGES) * (2 * TILE * SROW);
            elem_t* vs = ks + TILE * SROW;
            for (int e = tid; e < TILE * CHUNKS; e += WARPS * WARP_SIZE) {
                const int jj = e / CHUNKS, c = e % CHUNKS;
                const long long j = t0 + jj;
                const int so = jj * SROW + c * 8;
                if (jj >= n) {
                    *reinterpret_cast<uint4*>(ks + so) = make_uint4(0u, 0u, 0u, 0u);
                    *reinterpret_cast<uint4*>(vs + so) = make_uint4(0u, 0u, 0u, 0u);
                } else if (early && j >= new_lo) {
                    // a row of the step's new tokens: the append writes it here
                } else {
                    const long long row = ((long long)bt_row[j >> bs_shift] << bs_shift) + (j & bs_mask);
                    const long long go = row * pool_row + c * 8;
                    cp_async16(smem_addr(ks + so), k_pool + go);
                    cp_async16(smem_addr(vs + so), v_pool + go);
                }
            }
        }
        cp_async_commit();
    };

    // Rows of the step: token t's query heads of this group, row t * per + head.
    const int rows_total = per * num_tokens;
    // 0a. The step's small inputs are copied first, in a commit group of their own ahead of
    //     the tiles' (loads issued after the tiles' copies wait behind them: on an H200 at
    //     batch 1, 8k context, 12% of the split kernel's samples sat on the query load when it
    //     came after them): the first pass's query rows, as they are, into q_s.
    for (int e = tid; e < min(PASS_ROWS, rows_total) * CHUNKS; e += WARPS * WARP_SIZE) {
        const int r = e / CHUNKS, c = e % CHUNKS;
        const int t = r / per, hh = r % per;
        const elem_t* qr = q + ((tok + t) * num_heads + g * per + hh) * HEAD_DIM;
        cp_async16(smem_addr(q_s + r * SROW + c * 8), qr + c * 8);
    }
    cp_async_commit();

    // 0b. The first pass's first STAGES - 1 tiles go in flight now, under the append and the
    //     query rotation (their global latency would otherwise come after both).
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) load_tile(t, true);
    cp_async_wait<STAGES - 1>();   // the inputs' group (the tiles' groups may be in flight)
    __syncthreads();               // every thread's copies of it visible

    const float scale_log2 = softmax_scale * LOG2E;
    const unsigned ring_addr = smem_addr(kv_ring);
    // ldmatrix row addresses of this lane (matrix lm = lane / 8, row lr = lane % 8), in bytes:
    // Q (A operand): rows (lm & 1) * 8 + lr, dims (lm >> 1) * 8 of a k16 step;
    // K (B, keys as n): keys (lm >> 1) * 8 + lr, dims (lm & 1) * 8;
    // V (B via .trans, keys as k): keys (lm & 1) * 8 + lr, dims (lm >> 1) * 8 of an n16 pair.
    const int lm = lane / 8, lr = lane % 8;
    const unsigned qa_off = (unsigned)((((lm & 1) * 8 + lr) * SROW + (lm >> 1) * 8) * 2);
    const unsigned kb_off = (unsigned)((((lm >> 1) * 8 + lr) * SROW + (lm & 1) * 8) * 2);
    const unsigned vb_off = qa_off;
    const int rb = warp / WPR;                // the warp's row block of a pass
    const int kw0 = (warp % WPR) * KW;        // the warp's first key of each tile
    const unsigned q_addr = smem_addr(q_s) + (unsigned)(rb * MROWS * SROW * 2);
    const int qd = lane / 4, qc = 2 * (lane % 4);   // fragment row / first column
    float* red = reinterpret_cast<float*>(kv_ring);
    for (int r0 = 0; r0 < rows_total; r0 += PASS_ROWS) {
        const int rows = min(PASS_ROWS, rows_total - r0);
        __syncthreads();   // the previous pass is done with q_s, ml_s and the ring; the appended rows are visible
        // The pass's query rows, rotated, into q_s (zero rows past the step's rows; the first
        // pass's rows are in q_s already, as they are: step 0a).
        for (int r = warp; r < PASS_ROWS; r += WARPS) {
            if (r < rows) {
                const int t = (r0 + r) / per, hh = (r0 + r) % per;
                if (r0 == 0) continue;   // already rotated (qkv_prep)
                const elem_t* qr = q + ((tok + t) * num_heads + g * per + hh) * HEAD_DIM;
                float qv[LANE_D];
#pragma unroll
                for (int c = 0; c < LANE_D; ++c) qv[c] = load_ch(qr, c, lane);
#pragma unroll
                for (int c = 0; c < LANE_D; ++c)
                    if (ch_ok(c, lane)) store_elem(&q_s[r * SROW + c * WARP_SIZE + lane], qv[c]);
            } else {
#pragma unroll
                for (int c = 0; c < LANE_D; ++c)
                    if (ch_ok(c, lane)) store_elem(&q_s[r * SROW + c * WARP_SIZE + lane], 0.0f);
            }
        }
        // Keys [all_lo, all_hi) every row of the pass sees (both ends grow with the token: the
        // last token's start, the first token's end); a warp's keys of a tile inside them need
        // no per-score mask.
        int all_lo, all_hi, unused_end;
        visible_range((r0 + rows - 1) / per, num_tokens, sk, window_left, window_right, &all_lo, &unused_end);
        visible_range(r0 / per, num_tokens, sk, window_left, window_right, &unused_end, &all_hi);
        // Visible keys [vlo, vhi) of this lane's fragment rows qd and qd + 8 (none past the rows).
        int vlo[2], vhi[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = rb * MROWS + qd + 8 * i;
            if (r < rows) {
                visible_range((r0 + r) / per, num_tokens, sk, window_left, window_right, &vlo[i], &vhi[i]);
            } else {
                vlo[i] = 0;
                vhi[i] = 0;
            }
        }

        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
        // Rows qd and qd + 8: running max (log2 units) and this lane's part of the row sum.
        float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};

        if (r0 > 0) {
            // Later passes reload the first tiles (the first pass's are in flight already).
#pragma unroll
            for (int t = 0; t < STAGES - 1; ++t) load_tile(t, false);
        }
        for (int t = 0; t < n_tiles; ++t) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();   // tile t (and q_s) visible to all threads; slot (t - 1) % STAGES is free
            load_tile(t + STAGES - 1, false);
            const int t0 = s_lo + t * TILE;
            const int n = min(TILE, s_hi - t0);
            if (kw0 >= n) continue;
            const unsigned k_addr =
                ring_addr + (unsigned)(((t % STAGES) * (2 * TILE * SROW) + kw0 * SROW) * 2);
            const unsigned v_addr = k_addr + (unsigned)(TILE * SROW * 2);
            float s[2 * KB][4];
#pragma unroll
            for (int j = 0; j < 2 * KB; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                unsigned qa[4];
                ldmatrix_x4(qa, q_addr + qa_off + kk * 32);
#pragma unroll
                for (int kb = 0; kb < KB; ++kb) {
                    unsigned kf[4];
                    ldmatrix_x4(kf, k_addr + (unsigned)(kb * 16 * SROW * 2) + kb_off + kk * 32);
                    mma16816(s[2 * kb], qa, kf[0], kf[1]);
                    mma16816(s[2 * kb + 1], qa, kf[2], kf[3]);
                }
            }
            float mx[2] = {m[0], m[1]};
            // Warp-uniform: are all of this warp's keys of the tile visible to every row? (All
            // but the last tile of a split, the diagonal and the window's edge.)
            const bool whole = kw0 + KW <= n && t0 + kw0 >= all_lo && t0 + kw0 + KW <= all_hi;
            if (whole) {
#pragma unroll
                for (int j = 0; j < 2 * KB; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[j][e] *= scale_log2;
                        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
                    }
            } else {
#pragma unroll
                for (int j = 0; j < 2 * KB; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = kw0 + 8 * j + qc + (e & 1);
                        const int i = e >> 1;
                        const bool ok = key < n && t0 + key >= vlo[i] && t0 + key < vhi[i];
                        const float v = ok ? s[j][e] * scale_log2 : neg_inf();
                        s[j][e] = v;
                        mx[i] = fmaxf(mx[i], v);
                    }
            }
            float base[2], corr[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_WARP, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_WARP, mx[i], 2));
            }
            // No row's max moved in the whole warp: every correction is 1, the accumulator
            // rescale is skipped (bitwise the same result).
            const bool same_max = __all_sync(FULL_WARP, mx[0] == m[0] && mx[1] == m[1]);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                base[i] = mx[i] == neg_inf() ? 0.0f : mx[i];
                corr[i] = exp2f(m[i] - base[i]);
                m[i] = mx[i];
                l[i] *= corr[i];
            }
#pragma unroll
            for (int j = 0; j < 2 * KB; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[j][e] = exp2f(s[j][e] - base[e >> 1]);
                    l[e >> 1] += s[j][e];
                }
            if (!same_max) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc[nt][0] *= corr[0];
                    acc[nt][1] *= corr[0];
                    acc[nt][2] *= corr[1];
                    acc[nt][3] *= corr[1];
                }
            }
#pragma unroll
            for (int kb = 0; kb < KB; ++kb) {
                const unsigned pa[4] = {pack2(s[2 * kb][0], s[2 * kb][1]), pack2(s[2 * kb][2], s[2 * kb][3]),
                                        pack2(s[2 * kb + 1][0], s[2 * kb + 1][1]),
                                        pack2(s[2 * kb + 1][2], s[2 * kb + 1][3])};
                const unsigned vk = v_addr + (unsigned)(kb * 16 * SROW * 2) + vb_off;
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    unsigned vb[4];
                    ldmatrix_x4_trans(vb, vk + np * 32);
                    mma16816(acc[2 * np], pa, vb[0], vb[1]);
                    mma16816(acc[2 * np + 1], pa, vb[2], vb[3]);
                }
            }
        }
        cp_async_wait<0>();
        // The combine may be scheduled now (programmatic dependent launch, sm_90+: its launch
        // overlaps this kernel's tail; it waits for this kernel's completion before reading).
        grid_dependents_launch();

        // Merge the row block's warps: (m, l) through ml_s, scaled partial outputs through red.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[i] += __shfl_xor_sync(FULL_WARP, l[i], 1);
            l[i] += __shfl_xor_sync(FULL_WARP, l[i], 2);
        }
        if ((lane & 3) == 0) {
            ml_s[warp][qd][0] = m[0];
            ml_s[warp][qd][1] = l[0];
            ml_s[warp][qd + 8][0] = m[1];
            ml_s[warp][qd + 8][1] = l[1];
        }
        __syncthreads();   // every warp is done with the ring; ml_s complete
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = qd + 8 * i;
            float mm = neg_inf();
#pragma unroll
            for (int w = 0; w < WPR; ++w) mm = fmaxf(mm, ml_s[rb * WPR + w][row][0]);
            const float f = m[i] == neg_inf() ? 0.0f : exp2f(m[i] - mm);
            float* dst = red + (warp * MROWS + row) * HEAD_DIM + qc;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(acc[nt][2 * i] * f, acc[nt][2 * i + 1] * f);
        }
        __syncthreads();
        for (int idx = tid; idx < rows * HEAD_DIM; idx += WARPS * WARP_SIZE) {
            const int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
            const int w0 = (r / MROWS) * WPR, row = r % MROWS;
            float mm = neg_inf();
#pragma unroll
            for (int w = 0; w < WPR; ++w) mm = fmaxf(mm, ml_s[w0 + w][row][0]);
            float ll = 0.0f, o = 0.0f;
#pragma unroll
            for (int w = 0; w < WPR; ++w) {
                const float mw = ml_s[w0 + w][row][0];
                ll += mw == neg_inf() ? 0.0f : ml_s[w0 + w][row][1] * exp2f(mw - mm);
                o += red[((w0 + w) * MROWS + row) * HEAD_DIM + d];
            }
            const int t = (r0 + r) / per, hh = (r0 + r) % per;
            const long long orow =
                ((long long)split * merge_rows + rows_at + (long long)t * rows_step) * num_heads + g * per + hh;
            o_part[orow * HEAD_DIM + d] = ll > 0.0f ? o / ll : 0.0f;
            if (d == 0) lse_part[orow] = ll > 0.0f ? mm + log2f(ll) : neg_inf();
        }
    }
}

/// Warps per block of the merge kernel (`_combine`).
constexpr int MERGE_WARPS = 8;
/// Splits whose LSE and partial output a warp of `_combine` loads at once.
constexpr int MERGE_BATCH = 8;
extern "C" __global__ void __launch_bounds__(MERGE_WARPS * WARP_SIZE) decode_splitkv_bf16_hd80_norope_paged_w4_combine(const PagedDecodeParams p)
{
    const float* __restrict__ o_part = p.o_part;
    const float* __restrict__ lse_part = p.lse_part;
    elem_t* __restrict__ out = p.out;
    float* __restrict__ lse = p.lse;
    const int batch = p.merge_rows, num_heads = p.num_heads, num_splits = p.num_splits;
    // Launched as a programmatic dependent of the split kernel on sm_90+: wait until that
    // kernel has completed and its o_part / lse_part writes are visible.
    grid_dependency_wait();
    __shared__ float part[MERGE_WARPS][HEAD_DIM];
    __shared__ float part_m[MERGE_WARPS];
    __shared__ float part_t[MERGE_WARPS];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int b = blockIdx.x;
    const int h = blockIdx.y;
    const long long row = (long long)b * num_heads + h;
    const long long split_stride = (long long)batch * num_heads;
    // This warp's splits s = warp + MERGE_WARPS * k: running max mw (log2 units), the sum tw
    // of exp2(lse_s - mw) and the weighted outputs, MERGE_BATCH splits' loads at a time.
    float mw = neg_inf(), tw = 0.0f;
    float acc[LANE_D];
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) acc[c] = 0.0f;
    for (int s0 = warp; s0 < num_splits; s0 += MERGE_WARPS * MERGE_BATCH) {
        float ls[MERGE_BATCH];
        float ov[MERGE_BATCH][LANE_D];
#pragma unroll
        for (int j = 0; j < MERGE_BATCH; ++j) {
            const int s = s0 + j * MERGE_WARPS;
            const bool ok = s < num_splits;
            ls[j] = ok ? lse_part[s * split_stride + row] : neg_inf();
#pragma unroll
            for (int c = 0; c < LANE_D; ++c)
                ov[j][c] = ok && ch_ok(c, lane)
                               ? o_part[(s * split_stride + row) * HEAD_DIM + c * WARP_SIZE + lane]
                               : 0.0f;
        }
        float cm = mw;
#pragma unroll
        for (int j = 0; j < MERGE_BATCH; ++j) cm = fmaxf(cm, ls[j]);
        if (cm == neg_inf()) continue;   // no visible key in these splits yet (warp-uniform)
        const float sc = exp2f(mw - cm);  // 0 while mw is -inf
        tw *= sc;
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) acc[c] *= sc;
#pragma unroll
        for (int j = 0; j < MERGE_BATCH; ++j) {
            const float w = ls[j] == neg_inf() ? 0.0f : exp2f(ls[j] - cm);
            tw += w;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) acc[c] = fmaf(w, ov[j][c], acc[c]);
        }
        mw = cm;
    }
#pragma unroll
    for (int c = 0; c < LANE_D; ++c)
        if (ch_ok(c, lane)) part[warp][c * WARP_SIZE + lane] = acc[c];
    if (lane == 0) {
        part_m[warp] = mw;
        part_t[warp] = tw;
    }
    __syncthreads();
    if (warp != 0) return;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < MERGE_WARPS; ++w) mx = fmaxf(mx, part_m[w]);
    const bool any = mx != neg_inf();
    const float sink = neg_inf();
    const float m = fmaxf(mx, sink);
    // Each warp's share rescaled from its own max to m.
    float f[MERGE_WARPS];
    float total = any || sink != neg_inf() ? exp2f(sink - m) : 0.0f;
#pragma unroll
    for (int w = 0; w < MERGE_WARPS; ++w) {
        f[w] = part_m[w] == neg_inf() ? 0.0f : exp2f(part_m[w] - m);
        total += part_t[w] * f[w];
    }
    // Output row: the merge row's token in the packed batch; lse [num_heads, total_q].
    const long long tok = p.row_tokens[b];
    const long long orow = tok * num_heads + h;
    const long long lse_at = (long long)h * p.total_q + tok;
    const float inv = any ? 1.0f / total : 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        if (!ch_ok(c, lane)) continue;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < MERGE_WARPS; ++w) a = fmaf(part[w][c * WARP_SIZE + lane], f[w], a);
        float o = a * inv;
        store_elem(out + orow * HEAD_DIM + c * WARP_SIZE + lane, o);
    }
    // A sink column keeps the row non-empty (LSE = the sink logit when no key is visible).
    if (lane == 0) lse[lse_at] = any || sink != neg_inf() ? (m + log2f(total)) * LN2 : neg_inf();
}
