// Kernel `prefill_bf16_hd80_causal_bottom_right_paged_m128n64w4s2_sm80`: attention forward, FlashAttention-2 style, rendered from templates/prefill_sm80.cu.
// dtype bf16, head dim 80, mask causal_bottom_right, window false,
// sinks none, output gate false.
// Tile: BLOCK_M 128 query rows x BLOCK_N 64 keys per step, 4 warps
// (128 / 4 rows each), 2 K/V shared-memory stages.
//
// Launch: grid (ceil(max_seqlen_q / BLOCK_M), num_heads, batch), block (WARPS * 32),
// dynamic shared memory SMEM_BYTES = (BLOCK_M + 2 * STAGES * BLOCK_N) * (HEAD_DIM + 8) * 2.
// Parameters: the fields of `FwdParams` (partials/params.cu) as positional parameters, in
// its order (so the parameter buffer is byte for byte a FwdParams; the host launches with
// one `FwdParams` as that buffer, and tests/nvrtc_params_layout.rs checks the CUBIN's
// parameter offsets against it). Positional rather than one struct parameter: the struct
// costs the hot variants spills (hd128 causal: 0 -> 60 bytes of spill stores, ptxas sm_90).
//   (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch, num_heads, num_groups, seqlen_q,
//    seqlen_k, softmax_scale, window_left, window_right, mask, mask_stride_b/h/q/k, bias,
//    bias_stride_b/h/q/k, sinks, gate, max_logit, v_nonfinite, cache_seqlens_k,
//    cache_batch_offset, cache_max_batch, block_table, block_size, max_blocks_per_seq)
// Mask tensor false, additive bias false (as the simple kernel): `mask` uint8,
// nonzero = masked out, element (b, h, i, j) at b * mask_stride_b + h * mask_stride_h +
// i * mask_stride_q + j * mask_stride_k (stride 0 broadcasts; b = sequence index, i, j =
// positions within the sequence, also for packed input); `bias` f32 post-scale additive logit
// term at the same kind of strides. Variants without them ignore the pointers (may be null).
// With either, every visited KV tile is masked per element; a bias enters through
// biased_logit_log2 (partials/mask.cu: -inf masks, a finite bias never overflows). `max_logit`: f32 [num_heads], or null; when given, the
// caller fills it with -inf and the kernel raises each head's entry to the largest visible
// logit q.k * softmax_scale (order-independent atomic max: deterministic).
//
// Layouts (row-major, elements of elem_t unless stated):
//   padded (cu_seqlens_q == nullptr): q, out, gate [seqlen_q, batch, num_heads, HEAD_DIM];
//                                    k, v [seqlen_k, batch, num_groups, HEAD_DIM]
//   packed (cu_seqlens_q, cu_seqlens_k int32 [batch + 1]): q, out, gate [total_q, num_heads,
//        HEAD_DIM]; k, v [total_k, num_groups, HEAD_DIM]; seqlen_q = max query length.
//   static KV cache (padded q, cache_seqlens_k int32 [batch] given): k, v are one layer of a
//        cache [max_seq, cache_max_batch, num_groups, HEAD_DIM]; sequence b reads slot
//        cache_batch_offset + b, keys 0 .. cache_seqlens_k[b] (seqlen_k is ignored). Prefill
//        over the cache uses the bottom-right causal mask (the queries are the last keys).
//   paged KV cache (paged variants, `_paged` keys; packed q with cu_seqlens_q): k, v are one
//        layer of a pool [num_blocks, block_size, num_groups, HEAD_DIM]; request b attends to
//        its cache_seqlens_k[b] keys, key j in block block_table[b * max_blocks_per_seq +
//        j / block_size], row j % block_size (tiles may straddle blocks; 64-bit offsets);
//        cu_seqlens_k is ignored. Paged: true.
//   lse: f32 [num_heads, rows] natural log, rows = seqlen_q * batch (padded, row = i * batch + b)
//        or total_q (packed, row = token index); -inf for a row that sees no key.
// GQA by indexing: head h reads group h / (num_heads / num_groups).
//
// Per block: Q tile -> shared memory (cp.async), K/V tiles stream through a STAGES-deep
// cp.async ring (K and V in separate commit groups, so QK^T starts when K lands). S = Q K^T
// and O += P V run on mma.sync m16n8k16 (bf16 in, f32 accumulate), operands through
// ldmatrix (.trans for V), prefetched in registers: the fragments of the MMA step QK_PF
// (PV_PF) steps ahead load before the current step's MMAs issue. Rows are padded by 16 bytes in shared memory, so
// the 8 row addresses of every ldmatrix phase fall into distinct banks. Online softmax in base 2
// with softmax_scale * log2(e) folded into the exponent's FFMA; O and l are rescaled only when
// some row's running max grows by more than RESCALE_SLACK (lazy rescale, exact at the end). KV tiles that no row of the block can see are
// never visited; the range mask runs per element only on tiles some row sees partially (the
// diagonal and window edges, and the ragged last tile); a mask tensor or bias on every tile.
//
// Masked positions: a masked logit is selected to -inf whatever K or the bias hold there, but
// in O += P V a masked key's P = 0 times a NaN or Inf of its V is NaN. `v_nonfinite` (int32,
// or null) is the flag the producer of V raised when some V element is not finite (qkv_prep
// does); when it is set, variants that can mask keys inside a tile (any mask, window, mask
// tensor or bias) compute their rows with the exact one-warp-per-row loop of
// partials/attend.cu instead, which never reads a masked key: rows that see a non-finite V
// are non-finite, rows that do not are exact. A row that sees no key writes zeros and LSE
// -inf (the sink logit with a sink column).

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


constexpr int BLOCK_M = 128;
constexpr int BLOCK_N = 64;
constexpr int WARPS = 4;
constexpr int STAGES = 2;
constexpr int THREADS = WARPS * WARP_SIZE;
constexpr int WARP_ROWS = BLOCK_M / WARPS;  // query rows per warp
constexpr int MI = WARP_ROWS / 16;          // m16 tiles per warp
constexpr int NI = BLOCK_N / 8;             // n8 tiles of S per warp
constexpr int KD = HEAD_DIM / 16;           // k16 steps of Q K^T
constexpr int DN = HEAD_DIM / 8;            // n8 tiles of O
constexpr int KN = BLOCK_N / 16;            // k16 steps of P V
constexpr int SROW = HEAD_DIM + 8;          // shared-memory row stride (elements), 16 B pad
constexpr int CHUNKS = HEAD_DIM / 8;        // 16-byte chunks per row
constexpr int Q_ELEMS = BLOCK_M * SROW;
constexpr int KV_ELEMS = BLOCK_N * SROW;
static_assert(WARP_ROWS % 16 == 0 && MI >= 1, "each warp owns a multiple of 16 query rows");
static_assert(BLOCK_N % 16 == 0, "BLOCK_N must be a multiple of 16");
static_assert(HEAD_DIM % 16 == 0, "head dim must be a multiple of 16");
static_assert(STAGES >= 2, "the K/V ring needs at least two stages");

constexpr float FAST_LOG2E = 1.4426950408889634f;
constexpr float FAST_LN2 = 0.6931471805599453f;
// Lazy rescale threshold (log2 units): probabilities stay <= 2^8 between running-max moves.
constexpr float RESCALE_SLACK = 8.0f;
// Fragment prefetch distance (MMA steps of two n8 tiles) of Q K^T and of P V: 4 steps ahead
// (H200, 2026-11-27: +6-7% hd64 causal, +1-2% hd128 causal, +1-2.5% hd256 no mask, against 1
// step ahead), except hd256 with a causal / window / mask-tensor range (1 step: 1-1.5% faster
// there, same run).
constexpr int PF_WANT = 4;
constexpr int QK_PF = PF_WANT < NI / 2 ? PF_WANT : NI / 2;
constexpr int PV_PF = PF_WANT < KN * (DN / 2) ? PF_WANT : KN * (DN / 2);
static_assert(QK_PF >= 1 && QK_PF <= NI / 2, "Q K^T prefetch keeps at most two k16 steps of Q live");
static_assert(PV_PF >= 1 && PV_PF <= KN * (DN / 2), "P V prefetch stays inside the tile");

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
/// 16-byte async copy global -> shared; `valid == false` zero-fills the destination.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
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
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}


/// Async copy of `rows` rows (HEAD_DIM elements each, global row stride `stride` elements)
/// into shared memory rows of SROW elements; rows at or past `nvalid` are zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_tile(elem_t* dst, const elem_t* __restrict__ src, long long stride,
                                          int nvalid, int tid) {
    const unsigned base = smem_addr(dst);
#pragma unroll
    for (int c = tid; c < ROWS * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS;
        const int ch = c % CHUNKS;
        const bool ok = r < nvalid;
        const elem_t* g = ok ? src + (long long)r * stride + ch * 8 : src;
        cp_async16(base + (unsigned)((r * SROW + ch * 8) * 2), g, ok);
    }
}

// ---------------------------------------------------------------------------------------
// Shared by the tensor-core prefill kernels (prefill_sm80.cu, prefill_sm90.cu): the per-head
// max-logit record's atomic max, and (variants that can mask keys inside a tile) the exact
// one-warp-per-row path taken when `v_nonfinite` is set. Needs WARPS and, for exact_rows,
// partials/attend.cu.
// ---------------------------------------------------------------------------------------

/// Atomic max on a float (order-independent, so deterministic).
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
    if (v >= 0.0f) {
        atomicMax((int*)addr, __float_as_int(v));
    } else {
        atomicMin((unsigned int*)addr, __float_as_uint(v));
    }
}


extern "C" __global__ void __launch_bounds__(THREADS) prefill_bf16_hd80_causal_bottom_right_paged_m128n64w4s2_sm80(
// ---------------------------------------------------------------------------------------
// The tensor-core prefill kernels' (prefill_sm80.cu, prefill_sm90.cu) positional parameters,
// the fields of `FwdParams` (partials/params.cu) in its order, then the opening of the body
// with the casts of the mask-tensor and bias arguments the variant ignores. Included right
// after the kernel's `prefill_bf16_hd80_causal_bottom_right_paged_m128n64w4s2_sm80(`. With `tma` (prefill_sm90.cu's warp-specialized tile), a
// `TmaMaps` parameter follows the fields (`FwdTmaParams` on the host).
// ---------------------------------------------------------------------------------------
    const elem_t* __restrict__ q,
    const elem_t* __restrict__ k,
    const elem_t* __restrict__ v,
    elem_t* __restrict__ out,
    float* __restrict__ lse,
    const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ cu_seqlens_k,
    int batch,
    int num_heads,
    int num_groups,
    int seqlen_q,
    int seqlen_k,
    float softmax_scale,
    int window_left,
    int window_right,
    const unsigned char* __restrict__ mask,
    long long mask_stride_b,
    long long mask_stride_h,
    long long mask_stride_q,
    long long mask_stride_k,
    const float* __restrict__ bias,
    long long bias_stride_b,
    long long bias_stride_h,
    long long bias_stride_q,
    long long bias_stride_k,
    const float* __restrict__ sinks,
    const elem_t* __restrict__ gate,
    float* __restrict__ max_logit,
    const int* __restrict__ v_nonfinite,
    const int* __restrict__ cache_seqlens_k,
    int cache_batch_offset,
    int cache_max_batch,
    const int* __restrict__ block_table,
    int block_size,
    int max_blocks_per_seq)
{
    (void)mask; (void)mask_stride_b; (void)mask_stride_h; (void)mask_stride_q; (void)mask_stride_k;
    (void)bias; (void)bias_stride_b; (void)bias_stride_h; (void)bias_stride_q; (void)bias_stride_k;

    extern __shared__ uint4 smem_raw[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sK = sQ + Q_ELEMS;
    elem_t* sV = sK + STAGES * KV_ELEMS;

    const int tid = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int gq = lane / 4;  // row within an 8-row group of an mma fragment
    const int tq = lane % 4;  // column pair within an mma fragment
// ---------------------------------------------------------------------------------------
// The tensor-core prefill kernels' (prefill_sm80.cu, prefill_sm90.cu) block setup, inside the
// kernel body: the block's query rows, head, sequence (padded, packed, static or paged
// cache) and its row ranges; the `v_nonfinite` exact path (partials/prefill_common.cu); Q
// and K/V row strides and bases and the KV tiles [tile_lo, tile_hi) any row of the block
// can see (partials/q_block_tiles.cu); `s_mul`, the factor from S to log2-unit logits.
// Needs BLOCK_M, BLOCK_N and the kernel's parameters (partials/prefill_args.cu).
// ---------------------------------------------------------------------------------------
    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int grp = h / (num_heads / num_groups);
    const bool packed = cu_seqlens_q != nullptr;

    int sq, sk;
    long long q_tok0, k_tok0, q_step, k_step, total_q;
    if (packed) {
        const int q0 = cu_seqlens_q[b];
        sq = cu_seqlens_q[b + 1] - q0;
        // Paged cache: request b's keys 0 .. cache_seqlens_k[b] live in pool blocks
        // block_table[b, j / block_size], rows j % block_size (k_tok0/k_step unused).
        const int k0 = 0;
        sk = cache_seqlens_k[b];
        q_tok0 = q0;
        k_tok0 = k0;
        q_step = 1;
        k_step = 1;
        total_q = cu_seqlens_q[batch];
    } else {
        sq = seqlen_q;
        sk = seqlen_k;
        q_tok0 = b;
        k_tok0 = b;
        q_step = batch;
        k_step = batch;
        total_q = (long long)seqlen_q * batch;
        if (cache_seqlens_k != nullptr) {
            // Static KV cache: sequence b is cache slot cache_batch_offset + b of a
            // [max_seq, cache_max_batch, num_groups, HEAD_DIM] layer with cache_seqlens_k[b] keys.
            sk = cache_seqlens_k[b];
            k_tok0 = (long long)cache_batch_offset + b;
            k_step = cache_max_batch;
        }
    }
    const int m0 = m_block * BLOCK_M;
    if (m0 >= sq) return;
    const int m_valid = min(BLOCK_M, sq - m0);
    (void)v_nonfinite;  // no key is masked inside a tile: nothing to guard

// ---------------------------------------------------------------------------------------
// Inside a kernel body that owns query rows [m0, m0 + m_valid) of one head h (KV group grp)
// of a sequence (the prefill kernels through partials/prefill_block.cu, backward_sm80.cu's
// dq part): the Q and K/V row strides and bases, and the KV tiles [tile_lo, tile_hi) of
// BLOCK_N keys some row of the block can see (visible_range of its first and last rows;
// partials/mask.cu).
// ---------------------------------------------------------------------------------------
    const long long q_row_stride = q_step * num_heads * HEAD_DIM;
    const long long kv_row_stride = k_step * num_groups * HEAD_DIM;
    const long long q_base = ((q_tok0 + (long long)m0 * q_step) * num_heads + h) * HEAD_DIM;
    const long long kv_base = (k_tok0 * num_groups + grp) * HEAD_DIM;

    // Keys any row of the block can see, and the tiles every valid row sees fully.
    int lo_first, hi_first, lo_last, hi_last;
    visible_range(m0, sq, sk, window_left, window_right, &lo_first, &hi_first);
    visible_range(m0 + m_valid - 1, sq, sk, window_left, window_right, &lo_last, &hi_last);
    const int tile_lo = lo_first / BLOCK_N;
    const int tile_hi = hi_last > lo_first ? (hi_last + BLOCK_N - 1) / BLOCK_N : tile_lo;
    const int ntiles = tile_hi - tile_lo;

    const float s_mul = softmax_scale * FAST_LOG2E;


    // Per-row state: rows (mi, hh) = warp * WARP_ROWS + mi * 16 + gq + 8 * hh.
    float o[MI][DN][4];
    float m_run[MI][2], l_part[MI][2], m_vis[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mi][dn][e] = 0.0f;
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            m_run[mi][hh] = neg_inf();
            l_part[mi][hh] = 0.0f;
            m_vis[mi][hh] = neg_inf();
        }
    }
    (void)sinks;
    (void)kv_base; (void)kv_row_stride;
    // K/V rows through the block table: row j of the pool layer [num_blocks, block_size,
    // num_groups, HEAD_DIM] (64-bit offsets); rows at or past sk are zero-filled.
    const int* __restrict__ bt_row = block_table + (long long)b * max_blocks_per_seq;
    const int bs_shift = __ffs(block_size) - 1;  // block_size is a power of two (>= 16)
    const long long pool_row_stride = (long long)num_groups * HEAD_DIM;
    auto load_kv = [&](elem_t* dst, const elem_t* __restrict__ pool, int n0) {
        if (block_size >= BLOCK_N) {
            // n0 is a multiple of BLOCK_N, so the whole tile lies in one block: one
            // (broadcast) block-table read per tile, then the static tile load. Reading the
            // table per row put a dependent global load before every cp.async.
            const long long row0 =
                ((long long)bt_row[n0 >> bs_shift] << bs_shift) + (n0 & (block_size - 1));
            load_tile<BLOCK_N>(dst, pool + row0 * pool_row_stride + (long long)grp * HEAD_DIM,
                               pool_row_stride, sk - n0, tid);
            return;
        }
        const unsigned base = smem_addr(dst);
#pragma unroll
        for (int c = tid; c < BLOCK_N * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS;
            const int ch = c % CHUNKS;
            const int j = n0 + r;
            const bool ok = j < sk;
            const elem_t* g = pool;
            if (ok) {
                const long long row =
                    ((long long)bt_row[j >> bs_shift] << bs_shift) + (j & (block_size - 1));
                g = pool + (row * num_groups + grp) * HEAD_DIM + ch * 8;
            }
            cp_async16(base + (unsigned)((r * SROW + ch * 8) * 2), g, ok);
        }
    };

    // Prologue: group 0 = Q + K(tile 0), group 1 = V(tile 0), then K/V of tiles 1..STAGES-2.
    load_tile<BLOCK_M>(sQ, q + q_base, q_row_stride, m_valid, tid);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) {
            load_kv(sK + s * KV_ELEMS, k, (tile_lo + s) * BLOCK_N);
        }
        cp_async_commit();
        if (s < ntiles) {
            load_kv(sV + s * KV_ELEMS, v, (tile_lo + s) * BLOCK_N);
        }
        cp_async_commit();
    }

    const unsigned sQ_addr = smem_addr(sQ);
    const unsigned sK_addr = smem_addr(sK);
    const unsigned sV_addr = smem_addr(sV);
    const int warp_row0 = warp * WARP_ROWS;

    for (int t = 0; t < ntiles; ++t) {
        const int stage = t % STAGES;
        const int n0 = (tile_lo + t) * BLOCK_N;
        // K(t) (and Q) landed: V(t) and the tiles after it may still be in flight.
        cp_async_wait<2 * STAGES - 3>();
        __syncthreads();
        {
            // Refill the stage every warp finished with in iteration t - 1.
            const int tn = t + STAGES - 1;
            const int st = tn % STAGES;
            if (tn < ntiles) {
                load_kv(sK + st * KV_ELEMS, k, (tile_lo + tn) * BLOCK_N);
            }
            cp_async_commit();
            if (tn < ntiles) {
                load_kv(sV + st * KV_ELEMS, v, (tile_lo + tn) * BLOCK_N);
            }
            cp_async_commit();
        }

        // S = Q K^T for this warp's rows.
        float s[MI][NI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mi][ni][e] = 0.0f;
            }
        }
        const unsigned k_stage = sK_addr + (unsigned)(stage * KV_ELEMS * 2);
        // Fragments of step f + QK_PF (Q per k16 step, K per 16-key pair) load before step f's
        // MMAs (QK_PF + 1 K slots, two Q slots: QK_PF <= NI / 2 keeps at most two k16 steps live).
        constexpr int QK_STEPS = KD * (NI / 2);
        unsigned qa[2][MI][4];
        unsigned kb[QK_PF + 1][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const int r = warp_row0 + mi * 16 + (lane % 16);
            const int c = (lane / 16) * 8;
            ldmatrix_x4(qa[0][mi], sQ_addr + (unsigned)((r * SROW + c) * 2));
        }
#pragma unroll
        for (int f = 0; f < QK_PF; ++f) {
            const int r = (f % (NI / 2)) * 16 + (lane % 8) + (lane / 16) * 8;
            const int c = (f / (NI / 2)) * 16 + ((lane / 8) % 2) * 8;
            ldmatrix_x4(kb[f], k_stage + (unsigned)((r * SROW + c) * 2));
        }
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
            const int f = kk * (NI / 2) + nj;
            if (f + QK_PF < QK_STEPS) {
                const int kk1 = (f + QK_PF) / (NI / 2);
                const int nj1 = (f + QK_PF) % (NI / 2);
                if (nj1 == 0) {
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        const int r = warp_row0 + mi * 16 + (lane % 16);
                        const int c = kk1 * 16 + (lane / 16) * 8;
                        ldmatrix_x4(qa[kk1 & 1][mi], sQ_addr + (unsigned)((r * SROW + c) * 2));
                    }
                }
                const int r = nj1 * 16 + (lane % 8) + (lane / 16) * 8;
                const int c = kk1 * 16 + ((lane / 8) % 2) * 8;
                ldmatrix_x4(kb[(f + QK_PF) % (QK_PF + 1)], k_stage + (unsigned)((r * SROW + c) * 2));
            }
            const int fs = f % (QK_PF + 1);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                mma16816(s[mi][2 * nj], qa[kk & 1][mi], kb[fs][0], kb[fs][1]);
                mma16816(s[mi][2 * nj + 1], qa[kk & 1][mi], kb[fs][2], kb[fs][3]);
            }
        }
        }

        // Mask elements only where some row sees the tile partially (raw logits; the scale
        // is folded into the exponent's FFMA below, softmax_scale > 0 keeps the max).
        const bool full = n0 >= lo_last && n0 + BLOCK_N <= hi_first;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                int lo = 0, hi = 0;
                if (!full) {
                    const int i = m0 + warp_row0 + mi * 16 + gq + 8 * hh;
                    visible_range(i, sq, sk, window_left, window_right, &lo, &hi);
                }
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (!full) {
                            const int j = n0 + ni * 8 + 2 * tq + e;
                            if (j < lo || j >= hi) s[mi][ni][2 * hh + e] = neg_inf();
                        }
                    }
                }
            }
        }

        // Online softmax update, with lazy rescaling: the running max m_run (log2 units) only
        // moves when some row of the warp sees a logit more than RESCALE_SLACK above it (a
        // warp-uniform vote, so the branch skips the O/l rescale for the whole warp). Between
        // moves p = 2^(logit - m_run) <= 2^RESCALE_SLACK, harmless in f32 and exact in the end:
        // O, l and lse all use the same m_run.
        float mx_row[MI][2];
        bool grow = false;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = neg_inf();
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
                    mx = fmaxf(mx, fmaxf(s[mi][ni][2 * hh], s[mi][ni][2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(FULL_WARP, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(FULL_WARP, mx, 2));
                mx *= s_mul;  // log2 units (-inf stays -inf)
                m_vis[mi][hh] = fmaxf(m_vis[mi][hh], mx);
                mx_row[mi][hh] = mx;
                grow |= mx > m_run[mi][hh] + RESCALE_SLACK;
            }
        }
        if (__any_sync(FULL_WARP, grow)) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const float m_new = fmaxf(m_run[mi][hh], mx_row[mi][hh]);
                    const float m_use = m_new == neg_inf() ? 0.0f : m_new;
                    const float corr = fast_exp2(m_run[mi][hh] - m_use);
                    m_run[mi][hh] = m_new;
                    l_part[mi][hh] *= corr;
#pragma unroll
                    for (int dn = 0; dn < DN; ++dn) {
                        o[mi][dn][2 * hh] *= corr;
                        o[mi][dn][2 * hh + 1] *= corr;
                    }
                }
            }
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float m_use = m_run[mi][hh] == neg_inf() ? 0.0f : m_run[mi][hh];
                float sum = 0.0f;
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = fast_exp2(fmaf(s[mi][ni][2 * hh + e], s_mul, -m_use));
                        s[mi][ni][2 * hh + e] = p;
                        sum += p;
                    }
                }
                l_part[mi][hh] += sum;
            }
        }

        // V(t) landed (K/V of later tiles may still be in flight); every warp sees it.
        cp_async_wait<2 * STAGES - 2>();
        __syncthreads();

        // O += P V.
        const unsigned v_stage = sV_addr + (unsigned)(stage * KV_ELEMS * 2);
        // V fragments of step f + PV_PF load before step f's MMAs (PV_PF + 1 slots); P
        // fragments pack per k16 step.
        constexpr int PV_STEPS = KN * (DN / 2);
        unsigned vb[PV_PF + 1][4];
        unsigned pa[MI][4];
#pragma unroll
        for (int f = 0; f < PV_PF; ++f) {
            const int r = (f / (DN / 2)) * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
            const int c = (f % (DN / 2)) * 16 + (lane / 16) * 8;
            ldmatrix_x4_trans(vb[f], v_stage + (unsigned)((r * SROW + c) * 2));
        }
#pragma unroll
        for (int kk = 0; kk < KN; ++kk) {
#pragma unroll
        for (int dj = 0; dj < DN / 2; ++dj) {
            const int f = kk * (DN / 2) + dj;
            if (f + PV_PF < PV_STEPS) {
                const int kk1 = (f + PV_PF) / (DN / 2);
                const int dj1 = (f + PV_PF) % (DN / 2);
                const int r = kk1 * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                const int c = dj1 * 16 + (lane / 16) * 8;
                ldmatrix_x4_trans(vb[(f + PV_PF) % (PV_PF + 1)], v_stage + (unsigned)((r * SROW + c) * 2));
            }
            if (dj == 0) {
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    pa[mi][0] = pack2(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                    pa[mi][1] = pack2(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                    pa[mi][2] = pack2(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                    pa[mi][3] = pack2(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
                }
            }
            const int fs = f % (PV_PF + 1);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                mma16816(o[mi][2 * dj], pa[mi], vb[fs][0], vb[fs][1]);
                mma16816(o[mi][2 * dj + 1], pa[mi], vb[fs][2], vb[fs][3]);
            }
        }
        }
    }
    cp_async_wait<0>();

    // Epilogue: normalize, gate, stage this warp's rows in its own Q rows of shared memory
    // (only this warp ever read them), then write 16-byte chunks.
    float head_max = neg_inf();
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float l = l_part[mi][hh];
            l += __shfl_xor_sync(FULL_WARP, l, 1);
            l += __shfl_xor_sync(FULL_WARP, l, 2);
            const bool any = m_vis[mi][hh] != neg_inf();
            const float inv = any ? 1.0f / l : 0.0f;
            const int r = warp_row0 + mi * 16 + gq + 8 * hh;
            const int i = m0 + r;
            const bool row_ok = i < sq;
            const long long tok = q_tok0 + (long long)i * q_step;
            if (row_ok && tq == 0)
                lse[(long long)h * total_q + tok] =
                    any ? (m_run[mi][hh] + __log2f(l)) * FAST_LN2 : neg_inf();
            if (row_ok) head_max = fmaxf(head_max, m_vis[mi][hh]);
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                float o0 = o[mi][dn][2 * hh] * inv;
                float o1 = o[mi][dn][2 * hh + 1] * inv;
                *reinterpret_cast<unsigned*>(sQ + r * SROW + dn * 8 + 2 * tq) = pack2(o0, o1);
            }
        }
    }
    (void)gate;
    if (max_logit != nullptr) {
#pragma unroll
        for (int off = 4; off < WARP_SIZE; off <<= 1)
            head_max = fmaxf(head_max, __shfl_xor_sync(FULL_WARP, head_max, off));
        if (lane == 0 && head_max != neg_inf()) atomic_max_float(max_logit + h, head_max * FAST_LN2);
    }
    __syncwarp();
#pragma unroll
    for (int c = lane; c < WARP_ROWS * CHUNKS; c += WARP_SIZE) {
        const int r = warp_row0 + c / CHUNKS;
        const int ch = c % CHUNKS;
        const int i = m0 + r;
        if (i < sq) {
            const long long tok = q_tok0 + (long long)i * q_step;
            *reinterpret_cast<uint4*>(out + (tok * num_heads + h) * HEAD_DIM + ch * 8) =
                *reinterpret_cast<const uint4*>(sQ + r * SROW + ch * 8);
        }
    }
}
