// Kernel `prefill_bf16_hd128_padding_causal_bias_m128n128w12s3_sm90`: attention forward on Hopper's warpgroup MMA, rendered from
// templates/prefill_sm90.cu. dtype bf16, head dim 128, mask padding_causal, window
// false, sinks none, output gate false, mask tensor true,
// additive bias true, paged K/V false.
// Tile: BLOCK_M 128 query rows (one 64-row warpgroup each) x BLOCK_N 128 keys
// per step, 12 warps, 3 K/V shared-memory stages. Needs sm_90a (wgmma).
//
// Launch, parameters, layouts, masks, LSE, max_logit, sinks, gate, static and paged caches,
// and the `v_nonfinite` exact path: exactly as templates/prefill_sm80.cu (the same positional
// `FwdParams` parameter buffer, the same grid (ceil(max_seqlen_q / BLOCK_M), num_heads,
// batch)), with block (WARPS * 32) and dynamic shared memory
// SMEM_BYTES = (BLOCK_M + 2 * STAGES * BLOCK_N) * HEAD_DIM * 2 + 1024 (the kernel aligns its
// tiles to 1024 bytes, the period of the 128-byte swizzle).
//
// What differs from the sm80 kernel is the matrix core. Tiles live in shared memory in the
// layout `wgmma` reads with 128-byte swizzling (PTX ISA, "Shared Memory Matrix Layout"): a
// tile of R rows is HEAD_DIM / 64 panels of R x 64 elements (128 bytes per row); in a panel,
// 16-byte chunk c of row r sits at chunk c ^ (r % 8) of that row. Q, K, V all arrive that way
// by cp.async (16 bytes per thread; rows past the sequence zero-filled), made visible to the
// async proxy by `fence.proxy.async.shared::cta` before the barrier.
// Per step, each warpgroup (64 query rows):
//   S = Q K^T : wgmma m64n128k16, A = Q and B = K from shared memory (both K-major),
//               HEAD_DIM / 16 instructions into 4 * BLOCK_N / 8 f32 registers per thread;
//   softmax   : the sm80 kernel's online softmax on the accumulator (its fragment layout is
//               mma.sync's m16n8 layout per warp: warp w of the group owns rows 16w..16w+15);
//   O += P V  : wgmma m64n128k16 with A = P from registers (the accumulator
//               repacked to bf16, mma.sync's A layout) and B = V from shared memory,
//               MN-major (transposed read of the row-major V tile).
// K/V tiles stream through a STAGES-deep cp.async ring, one commit group per tile. With three
// or more stages (PIPELINE, the default up to head dim 192) step t issues S_t together with
// O += P_{t-1} V_{t-1} and runs the softmax of S_t while that product is in flight; with two
// (head dim 256) each step's P V follows its own softmax.
//
// Loading, two schedules (the tile's warp count says which):
// - WARPS == BLOCK_M / 16: every warp loads and the block synchronizes twice per tile.
// - WARPS == BLOCK_M / 16 + 4 (warp specialization, WS): the last warpgroup is the producer.
//   It drops to PRODUCER_REGS registers (`setmaxnreg`). With TMA tensor maps (`TmaMaps`,
//   `tma_maps.enabled`: padded or packed input, a static cache; a paged pool always) one of
//   its threads copies Q and each K/V tile as one TMA box per 64-column panel (a paged pool:
//   per pool block of the tile, from the producer warp's lanes; `cp.async.bulk.tensor`,
//   128-byte swizzle) completing on the stage's `full` mbarrier (expect_tx; the tile that
//   crosses the sequence's end first has its V rows past it zeroed, see the producer);
//   otherwise (no maps) its threads copy them by
//   cp.async and signal each stage's `full` mbarrier with `cp.async.mbarrier.arrive.noinc`;
//   the consumer warpgroups (raised to CONSUMER_REGS) wait on `full`, fence the async proxy,
//   and when done with a stage arrive on its `empty` mbarrier (one arrival per warp), which
//   the producer waits on before refilling it. No block-wide barrier in the main loop, so
//   the consumer warpgroups drift apart and one's softmax overlaps another's GEMMs.
//   SMEM_BYTES grows by 128 bytes for the barriers (after the V stages).

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
constexpr int HEAD_DIM = 128;
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


constexpr int BLOCK_M = 128;
constexpr int BLOCK_N = 128;
constexpr int WARPS = 12;
constexpr int STAGES = 3;
constexpr int THREADS = WARPS * WARP_SIZE;
constexpr int CONSUMER_WARPS = BLOCK_M / 16;   // one 16-row slice of the tile per warp
constexpr bool WS = WARPS > CONSUMER_WARPS;    // a producer warpgroup after the consumers
constexpr int LOADERS = WS ? 128 : THREADS;    // threads that issue the tile copies
constexpr int CONSUMER_THREADS = CONSUMER_WARPS * WARP_SIZE;
// Two consumer warpgroups under WS take turns issuing their GEMMs (named barriers 2 and 3),
// so one's softmax runs while the other's GEMMs do (FlashAttention-3's "ping-pong").
constexpr bool PINGPONG = WS && CONSUMER_WARPS == 8;
// setmaxnreg budgets of the WS schedule: PRODUCER_REGS * 128 + CONSUMER_REGS *
// CONSUMER_THREADS <= the block's allocation at launch, LAUNCH_REGS * THREADS (one block per
// SM: 65536 / THREADS rounded down to a multiple of 8; a `setmaxnreg.inc` beyond what the
// `dec`s released waits forever: a producer budget of 48 at head dim 256 hung the kernel on
// an H200); multiples of 8 in 24..256. ptxas allocates
// each side within its budget; these are the smallest producer budgets without spills
// (NVRTC 13, every feature variant, with both the TMA and the cp.async producer; head dim
// 256's O accumulator needs the larger consumer budget, which leaves its producer 40). Three consumer warpgroups get 160 and spill (not a default tile).
constexpr int PRODUCER_REGS = CONSUMER_WARPS >= 12 ? 24 : HEAD_DIM >= 256 ? 40 : 56;
constexpr int CONSUMER_REGS =
    CONSUMER_WARPS >= 12 ? 160 : CONSUMER_WARPS >= 8 ? (HEAD_DIM >= 256 ? 232 : 224) : 240;
constexpr int NI = BLOCK_N / 8;      // n8 tiles of S per warp
constexpr int KD = HEAD_DIM / 16;    // k16 steps of Q K^T
constexpr int DN = HEAD_DIM / 8;     // n8 tiles of O
constexpr int KN = BLOCK_N / 16;     // k16 steps of P V
constexpr int CHUNKS = HEAD_DIM / 8; // 16-byte chunks per row
constexpr int Q_BYTES = BLOCK_M * HEAD_DIM * 2;
constexpr int KV_BYTES = BLOCK_N * HEAD_DIM * 2;
static_assert(CONSUMER_WARPS * 16 == BLOCK_M && CONSUMER_WARPS % 4 == 0, "one 64-row warpgroup per 4 warps");
static_assert(WARPS == CONSUMER_WARPS || WARPS == CONSUMER_WARPS + 4, "at most one producer warpgroup");
constexpr int LAUNCH_REGS = 65536 / THREADS / 8 * 8;
static_assert(!WS || PRODUCER_REGS * 128 + CONSUMER_REGS * CONSUMER_THREADS <= LAUNCH_REGS * THREADS,
              "register budget");
static_assert(HEAD_DIM % 64 == 0, "128-byte swizzle panels of 64 elements");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma N");
static_assert(STAGES >= 2, "the K/V ring needs at least two stages");
// With three or more stages the P V product of step t - 1 runs while step t's softmax does
// (see the main loop); with two, each step's P V runs after its own softmax (the stage it
// reads is refilled one step later).
constexpr bool PIPELINE = STAGES >= 3;

constexpr float FAST_LOG2E = 1.4426950408889634f;
constexpr float FAST_LN2 = 0.6931471805599453f;
// Lazy rescale threshold (log2 units), as the sm80 kernel.
constexpr float RESCALE_SLACK = 8.0f;

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
// What the wgmma kernels (templates/prefill_sm90.cu, backward_dqdkdv_sm90.cu) share: the
// 128-byte-swizzled shared-memory tile layout and its cp.async loader, the shared-memory
// matrix descriptor, and the wgmma fence / commit / wait. Needs partials/types.cu and
// cp_async.cu first, and LOADERS (the threads that call load_tile).
// ---------------------------------------------------------------------------------------

/// Byte offset of 16-byte chunk `ch` of row `r` in a swizzled tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ unsigned sw_off(int r, int ch) {
    return (unsigned)((ch >> 3) * ROWS * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

/// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
/// leading and stride byte offsets (all >> 4), 128-byte swizzle (mode 1 in bits 62-63), kept
/// as its two 32-bit halves so that `gmma_at` steps the start address with one 32-bit add
/// (a 64-bit descriptor stepped by offset gets rebuilt whole: the compiler cannot see that
/// the 14-bit field never carries; ~10 instructions per wgmma on every product's issue path).
struct GmmaDesc {
    unsigned lo, hi;
};
__device__ __forceinline__ GmmaDesc gmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    GmmaDesc d;
    d.lo = ((addr & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16);
    d.hi = ((sbo >> 4) & 0x3FFF) | (1u << 30);
    return d;
}
/// The descriptor of the matrix `byte_off` bytes (a multiple of 16) after `d`'s: the start
/// address stays below the 256 KiB that its field spans (shared memory is at most 228 KiB),
/// so the add never carries out of it.
__device__ __forceinline__ unsigned long long gmma_at(GmmaDesc d, unsigned byte_off) {
    return ((unsigned long long)d.hi << 32) | (unsigned long long)(d.lo + (byte_off >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/// Keeps the compiler from moving accesses of an accumulator register across the async MMAs.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

/// Async copy of ROWS rows (HEAD_DIM elements each, global row stride `stride` elements) into
/// a swizzled tile by the LOADERS threads (`tid` in 0..LOADERS); rows at or past `nvalid` are
/// zero-filled.
/// With COLS, when LOADERS is a multiple of CHUNKS and every thread's rows are whole 8-row
/// swizzle periods apart, a thread copies one column of rows STEP apart, so its shared and
/// global offsets are one base each plus constants (the general index math below costs ~20
/// instructions per 16-byte copy); the bases stay live, so callers short of registers (the
/// warp-specialized prefill's producer, under the consumers' register cap) pass false.
template <int ROWS, bool COLS = true>
__device__ __forceinline__ void load_tile(unsigned base, const elem_t* __restrict__ src, long long stride,
                                          int nvalid, int tid) {
    constexpr int STEP = LOADERS / CHUNKS;  // rows between one thread's copies (column form)
    if constexpr (COLS && LOADERS % CHUNKS == 0 && STEP % 8 == 0 && ROWS % STEP == 0) {
        const int r0 = tid / CHUNKS, ch = tid % CHUNKS;
        const unsigned s0 = base + sw_off<ROWS>(r0, ch);
        const elem_t* g0 = src + (long long)r0 * stride + ch * 8;
#pragma unroll
        for (int i = 0; i < ROWS / STEP; ++i) {
            const bool ok = r0 + i * STEP < nvalid;
            cp_async16(s0 + (unsigned)(i * STEP * 128), ok ? g0 + i * STEP * stride : src, ok);
        }
    } else {
#pragma unroll
        for (int c = tid; c < ROWS * CHUNKS; c += LOADERS) {
            const int r = c / CHUNKS;
            const int ch = c % CHUNKS;
            const bool ok = r < nvalid;
            const elem_t* g = ok ? src + (long long)r * stride + ch * 8 : src;
            cp_async16(base + sw_off<ROWS>(r, ch), g, ok);
        }
    }
}


/// d (+)= A B, m64n128k16: A (64 x 16, K-major) and B (16 x BLOCK_N, K-major) from shared
/// memory; `accumulate == 0` overwrites d.
__device__ __forceinline__ void wgmma_qk(float (&d)[NI][4], unsigned long long desc_a,
                                         unsigned long long desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{ %0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 }, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

/// d += A B, m64n128k16: A (64 x 16) from registers (mma.sync's A fragment per
/// warp), B (16 x HEAD_DIM) from shared memory, MN-major (transposed).
__device__ __forceinline__ void wgmma_pv(float (&d)[DN][4], const unsigned (&a)[4], unsigned long long desc_b) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{ %0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 }, "
        "{ %64, %65, %66, %67 }, "
        "%68, 1, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

/// Named barriers 2 and 3 of the ping-pong between two consumer warpgroups (256 threads:
/// one warpgroup syncs, the other arrives).
__device__ __forceinline__ void named_bar_sync(int id) {
    asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}

/// mbarriers of the WS schedule (PTX ISA, "Parallel Synchronization and Communication
/// Instructions: mbarrier"); `bar` is a shared-space address, 8-byte aligned.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
/// Arrives on `bar` once every cp.async this thread issued before it has landed (the arrival
/// counts toward the barrier's expected count: no increment).
__device__ __forceinline__ void mbar_arrive_cp_async(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
/// Waits until phase `parity` (0 or 1) of `bar` has completed.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (done == 0);
}

/// The TMA tensor maps of a launch (the host's `TmaMaps`, 128-byte `CUtensorMap`s made by
/// `cuTensorMapEncodeTiled`): q, k and v as 4-d tensors [HEAD_DIM, heads (k, v: groups),
/// slots, rows], the token of row i in slot s being i * slots + s (padded: slots = batch;
/// packed: 1; a static cache's k and v: its batch slots), 128-byte swizzle, boxes of 64
/// columns x 1 x 1 x BLOCK_M (q) or BLOCK_N (k, v) rows: one swizzled panel of a tile,
/// exactly the layout `load_tile` writes; rows past the tensor read zeros. `enabled` 0: the
/// launch has no maps, the producer copies by cp.async.
struct alignas(64) TmaMaps {
    unsigned long long q[16];
    unsigned long long k[16];
    unsigned long long v[16];
    int enabled;
};

/// Arrives on `bar` and adds `bytes` to the transaction count its phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

/// TMA: the box of `map` (a generic address of a `__grid_constant__` tensor map) at
/// coordinates (c0, c1, c2, c3) into shared memory at `dst`; its bytes complete on `bar`.
__device__ __forceinline__ void tma_load_4d(unsigned dst, const void* map, int c0, int c1, int c2, int c3,
                                            unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, { %2, %3, %4, "
        "%5 }], [%6];\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
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
/// The block's rows computed exactly, one warp per row, never reading a masked key (the
/// path taken when `v_nonfinite` is set; see the header). Out of line, so the main loop's
/// registers stay as they are.
__device__ __noinline__ void exact_rows(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    elem_t* __restrict__ out, float* __restrict__ lse, long long q_tok0, long long q_step,
    long long k_tok0, long long k_step, long long total_q, int m0, int m_valid, int sq, int sk,
    int h, int grp, int b, int num_heads, int num_groups, float softmax_scale, int window_left,
    int window_right, const unsigned char* __restrict__ mask, long long mask_stride_b,
    long long mask_stride_h, long long mask_stride_q, long long mask_stride_k,
    const float* __restrict__ bias, long long bias_stride_b, long long bias_stride_h,
    long long bias_stride_q, long long bias_stride_k, const float* __restrict__ sinks,
    const elem_t* __restrict__ gate, float* __restrict__ max_logit)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    (void)LOG2E;  // logits come in log2 units from biased_logit_log2
    float head_max = neg_inf();
    for (int r = warp; r < m_valid; r += WARPS) {
        const int i = m0 + r;
        const long long tok = q_tok0 + (long long)i * q_step;
        const long long q_off = (tok * num_heads + h) * HEAD_DIM;
        float qv[LANE_D];
        load_q(qv, q + q_off, lane);
        int lo, hi;
        visible_range(i, sq, sk, window_left, window_right, &lo, &hi);
        RowState st;
        row_init(st, sinks, h);
        for (int j = lo; j < hi; ++j) {
            if (mask[(long long)b * mask_stride_b + (long long)h * mask_stride_h + (long long)i * mask_stride_q +
                     (long long)j * mask_stride_k] != 0)
                continue;
            const long long kv_off = ((k_tok0 + (long long)j * k_step) * num_groups + grp) * HEAD_DIM;
            const float bj = bias[(long long)b * bias_stride_b + (long long)h * bias_stride_h +
                                  (long long)i * bias_stride_q + (long long)j * bias_stride_k];
            if (bj == neg_inf()) continue;
            const float s = biased_logit_log2(row_dot(qv, k + kv_off, lane) * softmax_scale, bj);
            head_max = fmaxf(head_max, s);
            row_update(st, s, v + kv_off, lane);
        }
        row_finish(st, out + q_off, gate + q_off, lse + (long long)h * total_q + tok, lane);
    }
    if (max_logit != nullptr && lane == 0 && head_max != neg_inf())
        atomic_max_float(max_logit + h, head_max * LN2);
}


extern "C" __global__ void __launch_bounds__(THREADS, 1) prefill_bf16_hd128_padding_causal_bias_m128n128w12s3_sm90(
// ---------------------------------------------------------------------------------------
// The tensor-core prefill kernels' (prefill_sm80.cu, prefill_sm90.cu) positional parameters,
// the fields of `FwdParams` (partials/params.cu) in its order, then the opening of the body
// with the casts of the mask-tensor and bias arguments the variant ignores. Included right
// after the kernel's `prefill_bf16_hd128_padding_causal_bias_m128n128w12s3_sm90(`. With `tma` (prefill_sm90.cu's warp-specialized tile), a
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
    int max_blocks_per_seq,
    // After FwdParams' fields: the TMA tensor maps (prefill_sm90.cu's warp-specialized tile).
    // NVRTC places this 64-byte-aligned struct at byte 240 of the parameter buffer, 64-byte
    // aligned in the constant bank where sm_90's parameters start (0x210): the host's
    // `FwdTmaParams`, held to it by tests/nvrtc_catalog.rs.
    const __grid_constant__ TmaMaps tma_maps)
{

    extern __shared__ uint4 smem_raw[];
    // Tiles on a 1024-byte boundary (the swizzle pattern's period; descriptors' base offset 0).
    const unsigned raw_addr = smem_addr(smem_raw);
    const unsigned pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_raw) + pad;
    const unsigned sQ_addr = raw_addr + pad;
    const unsigned sK_addr = sQ_addr + Q_BYTES;
    const unsigned sV_addr = sK_addr + STAGES * KV_BYTES;

    const int tid = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int wg = warp / 4;  // warpgroup: query rows wg * 64 .. wg * 64 + 63
    const int gq = lane / 4;  // row within an 8-row group of a fragment
    const int tq = lane % 4;  // column pair within a fragment
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
        const int k0 = cu_seqlens_k[b];
        sk = cu_seqlens_k[b + 1] - k0;
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
    if (v_nonfinite != nullptr && *v_nonfinite != 0) {
        exact_rows(q, k, v, out, lse, q_tok0, q_step, k_tok0, k_step, total_q, m0, m_valid, sq, sk,
                   h, grp, b, num_heads, num_groups, softmax_scale, window_left, window_right, mask,
                   mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k, bias, bias_stride_b,
                   bias_stride_h, bias_stride_q, bias_stride_k, sinks, gate, max_logit);
        return;
    }

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

    // With a bias, S holds finished logits in log2 units (biased_logit_log2: a finite bias
    // never overflows); without one, raw q.k with the scale folded into the exponent's FFMA.
    const float s_mul = 1.0f;
    (void)FAST_LOG2E;

    const int ltid = WS ? tid - CONSUMER_THREADS : tid;  // index among the loading threads
    // WS barriers after the V stages: Q full, then per stage K/V full and empty.
    const unsigned bar_q = sV_addr + STAGES * KV_BYTES;
    const unsigned bar_full = bar_q + 8;
    const unsigned bar_empty = bar_full + 8 * STAGES;
    const unsigned bar_tail = bar_empty + 8 * STAGES;
    // TMA (the warp-specialized tile with maps): one thread arrives on `full` with the bytes
    // of the stage's boxes (or, for the tile that crosses the sequence's end, once the
    // producer warp has zeroed its V rows past it: `bar_tail`); else every loading thread
    // arrives once its cp.async have landed.
    const bool use_tma = tma_maps.enabled != 0;
    if (WS) {
        if (tid == 0) {
            const unsigned arrivals = use_tma ? 1 : LOADERS;
            mbar_init(bar_q, arrivals);
            for (int s = 0; s < STAGES; ++s) {
                mbar_init(bar_full + 8 * s, arrivals);
                mbar_init(bar_empty + 8 * s, CONSUMER_WARPS);
            }
            mbar_init(bar_tail, 1);
            // The initialized barriers visible to the async proxy (the TMA's completions).
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        }
        __syncthreads();
    }

    // Per-thread state of rows r_hh = warp * 16 + gq + 8 * hh.
    float o[DN][4];
    float m_run[2], l_part[2], m_vis[2];
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dn][e] = 0.0f;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        m_run[hh] = neg_inf();
        l_part[hh] = 0.0f;
        m_vis[hh] = neg_inf();
    }
    (void)sinks;
    (void)block_table; (void)block_size; (void)max_blocks_per_seq;
    auto load_kv = [&](unsigned dst, const elem_t* __restrict__ src, int n0) {
        load_tile<BLOCK_N, !WS>(dst, src + kv_base + (long long)n0 * kv_row_stride, kv_row_stride, sk - n0,
                                ltid);
    };

    if (WS && warp >= CONSUMER_WARPS) {
        // Producer warpgroup: Q, then every K/V tile into its stage once the consumers have
        // released it (tile t's stage is released for tile t + STAGES).
        // TMA: one thread issues every copy, one box per 64-column panel (coordinates column,
        // head / group, slot, row of the maps' 4-d view; 32-bit: the host maps no tensor of
        // 2^31 rows or more). Q's boxes go before the register budget drops, so that its
        // coordinates are not live in the producer's 40-56 registers.
        if (use_tma && ltid == 0) {
            mbar_arrive_expect_tx(bar_q, Q_BYTES);
#pragma unroll
            for (int pn = 0; pn < HEAD_DIM / 64; ++pn)
                tma_load_4d(sQ_addr + pn * BLOCK_M * 128, tma_maps.q, pn * 64, h, (int)q_tok0 % (int)q_step,
                            (int)q_tok0 / (int)q_step + m0, bar_q);
        }
        const int k_slot = (int)k_tok0 % (int)k_step, k_row0 = (int)k_tok0 / (int)k_step;
        __syncwarp();  // setmaxnreg is .sync.aligned: the warp converged after lane 0's branch
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        if (use_tma) {
            // The first producer warp; lane 0 issues the copies. A box reads whatever rows
            // follow the sequence in the tensor (the next packed sequence, later cache rows:
            // finite or not) and zeros past the tensor's end. Scores of keys past `sk` are
            // masked, but 0 * inf in P V is not 0: so the tile that crosses `sk` lands on
            // `bar_tail`, the warp zeroes its V rows from `sk` on (whole 128-byte panel rows:
            // the swizzle permutes chunks within a row), fences them to the async proxy
            // (wgmma reads there) and only then arrives on the stage's `full`.
            if (ltid < WARP_SIZE) {
                for (int t = 0; t < ntiles; ++t) {
                    const int st = t % STAGES;
                    if (t >= STAGES) mbar_wait(bar_empty + 8 * st, (unsigned)((t / STAGES - 1) & 1));
                    const int n0 = (tile_lo + t) * BLOCK_N;
                    const bool tail = n0 + BLOCK_N > sk;
                    const unsigned bar = tail ? bar_tail : bar_full + 8 * st;
                    if (ltid == 0) {
                        const int row = k_row0 + n0;
                        mbar_arrive_expect_tx(bar, 2 * KV_BYTES);
#pragma unroll
                        for (int pn = 0; pn < HEAD_DIM / 64; ++pn) {
                            tma_load_4d(sK_addr + st * KV_BYTES + pn * BLOCK_N * 128, tma_maps.k, pn * 64, grp,
                                        k_slot, row, bar);
                            tma_load_4d(sV_addr + st * KV_BYTES + pn * BLOCK_N * 128, tma_maps.v, pn * 64, grp,
                                        k_slot, row, bar);
                        }
                    }
                    if (tail) {
                        // At most one such tile per block (the last): phase 0.
                        mbar_wait(bar_tail, 0);
                        const int r0 = max(sk - n0, 0);
                        for (int c = r0 * 8 + ltid; c < BLOCK_N * 8 * (HEAD_DIM / 64); c += WARP_SIZE) {
                            const int pn = c / (BLOCK_N * 8), rc = c % (BLOCK_N * 8);
                            if (rc < r0 * 8) continue;
                            asm volatile("st.shared.v4.u32 [%0], { %1, %1, %1, %1 };\n" ::"r"(
                                             sV_addr + st * KV_BYTES + pn * BLOCK_N * 128 + rc * 16),
                                         "r"(0u)
                                         : "memory");
                        }
                        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                        __syncwarp();
                        if (ltid == 0) mbar_arrive(bar_full + 8 * st);
                    }
                }
            }
            return;
        }
        load_tile<BLOCK_M, !WS>(sQ_addr, q + q_base, q_row_stride, m_valid, ltid);
        mbar_arrive_cp_async(bar_q);
        for (int t = 0; t < ntiles; ++t) {
            const int st = t % STAGES;
            if (t >= STAGES) mbar_wait(bar_empty + 8 * st, (unsigned)((t / STAGES - 1) & 1));
            load_kv(sK_addr + st * KV_BYTES, k, (tile_lo + t) * BLOCK_N);
            load_kv(sV_addr + st * KV_BYTES, v, (tile_lo + t) * BLOCK_N);
            mbar_arrive_cp_async(bar_full + 8 * st);
        }
        cp_async_wait<0>();
        return;
    }
    if (WS) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
        // Ping-pong: warpgroup 0 issues its GEMMs first.
        if (PINGPONG && wg == 1) named_bar_arrive(2);
        mbar_wait(bar_q, 0);
    } else {
        // Prologue: group 0 = Q + K/V(tile 0), then one group per tile up to STAGES - 2.
        load_tile<BLOCK_M, !WS>(sQ_addr, q + q_base, q_row_stride, m_valid, tid);
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < ntiles) {
                load_kv(sK_addr + s * KV_BYTES, k, (tile_lo + s) * BLOCK_N);
                load_kv(sV_addr + s * KV_BYTES, v, (tile_lo + s) * BLOCK_N);
            }
            cp_async_commit();
        }
    }

    const int warp_row0 = warp * 16;
    // This warpgroup's 64 rows of Q: panel p at sQ + p * BLOCK_M * 128, rows wg * 64 ...
    const unsigned q_wg = sQ_addr + (unsigned)(wg * 64 * 128);

    // PIPELINE (per warpgroup): step t issues S_t = Q K_t^T and O += P_{t-1} V_{t-1}
    // together, runs the softmax of S_t while the P V product is in flight, then (once it
    // is done) rescales O and packs P_t; the K/V stage of tile t - 1 is refilled (tile
    // t + STAGES - 1) after a second barrier, once every warpgroup's P_{t-1} V_{t-1} is done.
    // Otherwise step t runs S_t, softmax, O += P_t V_t in order, and refills the stage of
    // tile t - 1 right after the step's first barrier.
    unsigned pa[KN][4];
    float corr_o[2];
    for (int t = 0; t < ntiles; ++t) {
        const int stage = t % STAGES;
        const int n0 = (tile_lo + t) * BLOCK_N;
        if (WS) {
            // The producer's copies of this tile have landed; make them visible to wgmma.
            mbar_wait(bar_full + 8 * stage, (unsigned)((t / STAGES) & 1));
            // cp.async wrote through the generic proxy: make it visible to wgmma (TMA writes
            // in the async proxy already).
            // (Parameters, not a register: the hd256 consumers have none to spare.)
            if (tma_maps.enabled == 0)
                asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        } else {
            cp_async_wait<STAGES - 2>();
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncthreads();
        }
        if (!WS && !PIPELINE) {
            const int tn = t + STAGES - 1;
            const int st = tn % STAGES;
            if (tn < ntiles) {
                load_kv(sK_addr + st * KV_BYTES, k, (tile_lo + tn) * BLOCK_N);
                load_kv(sV_addr + st * KV_BYTES, v, (tile_lo + tn) * BLOCK_N);
            }
            cp_async_commit();
        }

        float s[NI][4];
        const unsigned k_stage = sK_addr + (unsigned)(stage * KV_BYTES);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(s[ni][e]);
        }
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(o[dn][e]);
        }
        if (PINGPONG) named_bar_sync(2 + wg);  // this warpgroup's turn on the tensor cores
        wgmma_fence();
        const GmmaDesc desc_q = gmma_desc(q_wg, 16, 1024), desc_k = gmma_desc(k_stage, 16, 1024);
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            const unsigned a = (unsigned)((kk / 4) * BLOCK_M * 128 + (kk % 4) * 32);
            const unsigned bk = (unsigned)((kk / 4) * BLOCK_N * 128 + (kk % 4) * 32);
            wgmma_qk(s, gmma_at(desc_q, a), gmma_at(desc_k, bk), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        if (PIPELINE && t > 0) {
            // O += P_{t-1} V_{t-1}: V rows kk * 16 .. of its stage; 64-column panels
            // BLOCK_N * 128 bytes apart (leading byte offset), 8-row groups 1024 bytes apart.
            const unsigned v_stage = sV_addr + (unsigned)(((t - 1) % STAGES) * KV_BYTES);
#pragma unroll
            for (int kk = 0; kk < KN; ++kk)
                wgmma_pv(o, pa[kk], gmma_at(gmma_desc(v_stage, BLOCK_N * 128, 1024), (unsigned)(kk * 16 * 128)));
            wgmma_commit();
            if (PINGPONG) named_bar_arrive(3 - wg);  // the other warpgroup's turn
            wgmma_wait<1>();
        } else {
            if (PINGPONG) named_bar_arrive(3 - wg);
            wgmma_wait<0>();
        }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(s[ni][e]);
        }

        const bool full = n0 >= lo_last && n0 + BLOCK_N <= hi_first;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            int lo = 0, hi = 0;
            if (!full) {
                const int i = m0 + warp_row0 + gq + 8 * hh;
                visible_range(i, sq, sk, window_left, window_right, &lo, &hi);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (!full) {
                        const int j = n0 + ni * 8 + 2 * tq + e;
                        if (j < lo || j >= hi) s[ni][2 * hh + e] = neg_inf();
                    }
                }
            }
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = m0 + warp_row0 + gq + 8 * hh;
            if (i < sq) {
                const unsigned char* mrow = mask + (long long)b * mask_stride_b +
                                            (long long)h * mask_stride_h + (long long)i * mask_stride_q;
                const float* brow = bias + (long long)b * bias_stride_b + (long long)h * bias_stride_h +
                                    (long long)i * bias_stride_q;
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int j = n0 + ni * 8 + 2 * tq + e;
                        if (j < sk) {
                            float x = s[ni][2 * hh + e];
                            x = x == neg_inf() ? x
                                : biased_logit_log2(x * softmax_scale, brow[(long long)j * bias_stride_k]);
                            if (mrow[(long long)j * mask_stride_k] != 0) x = neg_inf();
                            s[ni][2 * hh + e] = x;
                        }
                    }
                }
            }
        }

        // Online softmax with lazy rescaling (as the sm80 kernel); O's rescale waits for the
        // P V product in flight.
        float mx_row[2];
        bool grow = false;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float mx = neg_inf();
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mx = fmaxf(mx, fmaxf(s[ni][2 * hh], s[ni][2 * hh + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_WARP, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_WARP, mx, 2));
            mx *= s_mul;
            m_vis[hh] = fmaxf(m_vis[hh], mx);
            mx_row[hh] = mx;
            grow |= mx > m_run[hh] + RESCALE_SLACK;
        }
        const bool rescale = __any_sync(FULL_WARP, grow);
        if (rescale) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float m_new = fmaxf(m_run[hh], mx_row[hh]);
                const float m_use = m_new == neg_inf() ? 0.0f : m_new;
                corr_o[hh] = fast_exp2(m_run[hh] - m_use);
                m_run[hh] = m_new;
                l_part[hh] *= corr_o[hh];
            }
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float m_use = m_run[hh] == neg_inf() ? 0.0f : m_run[hh];
            float sum = 0.0f;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = fast_exp2(fmaf(s[ni][2 * hh + e], s_mul, -m_use));
                    s[ni][2 * hh + e] = p;
                    sum += p;
                }
            }
            l_part[hh] += sum;
        }

        // P_{t-1} V_{t-1} done: O and pa are free.
        wgmma_wait<0>();
        if (WS && PIPELINE && t > 0 && lane == 0) mbar_arrive(bar_empty + 8 * ((t - 1) % STAGES));
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(o[dn][e]);
        }
        if (rescale) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
                for (int dn = 0; dn < DN; ++dn) {
                    o[dn][2 * hh] *= corr_o[hh];
                    o[dn][2 * hh + 1] *= corr_o[hh];
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < KN; ++kk) {
            pa[kk][0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }

        if (PIPELINE) {
            if (!WS) {
                // Every warpgroup is done with tile t - 1's stage: refill it with tile
                // t + STAGES - 1 (under WS the producer does, once the stage is released).
                __syncthreads();
                const int tn = t + STAGES - 1;
                const int st = tn % STAGES;
                if (tn < ntiles) {
                    load_kv(sK_addr + st * KV_BYTES, k, (tile_lo + tn) * BLOCK_N);
                    load_kv(sV_addr + st * KV_BYTES, v, (tile_lo + tn) * BLOCK_N);
                }
                cp_async_commit();
            }
        } else {
            // O += P_t V_t now (under WS, then release the stage).
            const unsigned v_stage = sV_addr + (unsigned)(stage * KV_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KN; ++kk)
                wgmma_pv(o, pa[kk], gmma_at(gmma_desc(v_stage, BLOCK_N * 128, 1024), (unsigned)(kk * 16 * 128)));
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
                for (int e = 0; e < 4; ++e) reg_fence(o[dn][e]);
            }
            if (WS && lane == 0) mbar_arrive(bar_empty + 8 * stage);
        }
    }
    if (PIPELINE && ntiles > 0) {
        const unsigned v_stage = sV_addr + (unsigned)(((ntiles - 1) % STAGES) * KV_BYTES);
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(o[dn][e]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KN; ++kk)
            wgmma_pv(o, pa[kk], gmma_at(gmma_desc(v_stage, BLOCK_N * 128, 1024), (unsigned)(kk * 16 * 128)));
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
            for (int e = 0; e < 4; ++e) reg_fence(o[dn][e]);
        }
    }
    // Ping-pong: take warpgroup 1's last hand-over, so no barrier is left half-arrived.
    if (PINGPONG && wg == 0) named_bar_sync(2);
    if (WS) {
        // Consumers only (the producer has left): every warpgroup is done reading Q.
        asm volatile("bar.sync 1, %0;\n" ::"n"(CONSUMER_THREADS) : "memory");
    } else {
        cp_async_wait<0>();
        __syncthreads();  // every warpgroup is done reading Q: its rows become the output staging
    }

    float head_max = neg_inf();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float l = l_part[hh];
        l += __shfl_xor_sync(FULL_WARP, l, 1);
        l += __shfl_xor_sync(FULL_WARP, l, 2);
        const bool any = m_vis[hh] != neg_inf();
        const float inv = any ? 1.0f / l : 0.0f;
        const int r = warp_row0 + gq + 8 * hh;
        const int i = m0 + r;
        const bool row_ok = i < sq;
        const long long tok = q_tok0 + (long long)i * q_step;
        if (row_ok && tq == 0)
            lse[(long long)h * total_q + tok] = any ? (m_run[hh] + __log2f(l)) * FAST_LN2 : neg_inf();
        if (row_ok) head_max = fmaxf(head_max, m_vis[hh]);
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
            float o0 = o[dn][2 * hh] * inv;
            float o1 = o[dn][2 * hh + 1] * inv;
            *reinterpret_cast<unsigned*>(smem + sw_off<BLOCK_M>(r, dn) + 4 * tq) = pack2(o0, o1);
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
    for (int c = lane; c < 16 * CHUNKS; c += WARP_SIZE) {
        const int r = warp_row0 + c / CHUNKS;
        const int ch = c % CHUNKS;
        const int i = m0 + r;
        if (i < sq) {
            const long long tok = q_tok0 + (long long)i * q_step;
            *reinterpret_cast<uint4*>(out + (tok * num_heads + h) * HEAD_DIM + ch * 8) =
                *reinterpret_cast<const uint4*>(smem + sw_off<BLOCK_M>(r, ch));
        }
    }
}
