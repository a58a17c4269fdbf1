// Kernel `flashdec_bf16_hd256_ropehalf256_w8`: one decode step over a static KV cache (flash-decoding), rendered from
// templates/flash_decode.cu. dtype bf16, head dim 256, causal bottom_right,
// window false, rope half over 256 channels, 32 keys per tile,
// 3-stage cp.async ring.
//
// `flashdec_bf16_hd256_ropehalf256_w8` (split kernel), one block per (split, group, sequence), one warp per query head
// of the group (heads h_local = warp + r * warps, r = 0, 1, ...): for sequence b at position
// pos = cache_seqlens[b] it
//   1. rotates the new k (and each warp its q) with the cos/sin tables at row pos,
//   2. appends the rotated k and v at cache row pos (the block whose split owns pos writes;
//      every block takes row pos from its shared-memory copy, never from the cache),
//   3. attends over keys [lo, hi) of its split of the visible range [0, pos + 1) (bottom-right
//      causal, window): K/V tiles of TILE keys stream through a STAGES-deep ring of 16-byte
//      cp.async copies shared by all heads of the group (each K/V element read once per
//      group); q.k with LPK lanes per key (16-byte shared reads) and a transposed shuffle
//      reduction that leaves one key's score per lane; online softmax in exp2; P.V with each
//      lane owning HEAD_DIM / 32 contiguous output dims,
//   and writes the split's normalized partial output and its LSE (log2 units, -inf = no key).
// `flashdec_bf16_hd256_ropehalf256_w8_merge`: one block of MERGE_WARPS warps per (sequence, head), each warp a strided
// subset of the splits; merges the splits by their LSEs, adds the sink column, applies the
// output gate and writes out and lse.
//
// Launch: split kernel grid (num_splits, num_groups, batch), block min(per, 8) * 32, dynamic
//         shared memory STAGES * 2 * TILE * HEAD_DIM * sizeof(elem_t) bytes;
//         merge kernel grid (batch, num_heads), block MERGE_WARPS * 32.
//
// Layouts (row-major):
//   q, out, gate: elem_t [batch, num_heads, HEAD_DIM]   (q not yet rotated)
//   k_new, v_new: elem_t [batch, num_groups, HEAD_DIM]  (k not yet rotated)
//   k_cache, v_cache: elem_t [max_seq, max_batch, num_groups, HEAD_DIM], 16-byte aligned;
//       sequence b at batch slot batch_offset + b; offsets are 64-bit.
//   cache_seqlens: int32 [batch]; rope_cos, rope_sin: f32 [rope_rows, ROT_DIM / 2]
//   o_part: f32 [num_splits, batch, num_heads, HEAD_DIM]; lse_part: f32 [num_splits, batch, num_heads]
//   lse: f32 [num_heads, batch] (natural log); sinks: f32 [num_heads] (learnable sinks only)

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
/// Channels held by each lane: channel `c * WARP_SIZE + lane`, `c < LANE_D`.
constexpr int LANE_D = HEAD_DIM / WARP_SIZE;
static_assert(HEAD_DIM % WARP_SIZE == 0, "head dim must be a multiple of the warp size");

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


constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr int ROT_DIM = 256;
/// Keys per shared-memory tile: one score per lane after the transposed reduction.
constexpr int TILE = 32;
/// Depth of the cp.async ring (tiles in flight while one is consumed: STAGES - 1).
constexpr int STAGES = 3;
constexpr int MAX_WARPS = 8;
/// 16-byte chunks per K/V row.
constexpr int CHUNKS = HEAD_DIM / 8;
/// Lanes sharing one key in q.k (each holds CPL chunks of it), keys per warp step.
constexpr int LPK = CHUNKS < 16 ? CHUNKS : 16;
constexpr int CPL = CHUNKS / LPK;
constexpr int KPW = WARP_SIZE / LPK;
constexpr int LOG_LPK = LPK == 16 ? 4 : LPK == 8 ? 3 : LPK == 4 ? 2 : LPK == 2 ? 1 : 0;
static_assert((1 << LOG_LPK) == LPK, "LPK must be a power of two up to 16");
static_assert(TILE == KPW * LPK, "one score per lane after the reduction");
static_assert(LANE_D % 2 == 0, "each lane owns whole 32-bit pairs of V");

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/// The two elements of a 32-bit word (low half first) as floats.
__device__ __forceinline__ void unpack2(bf16_t*, unsigned w, float& a, float& b) {
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack2(f16_t*, unsigned w, float& a, float& b) {
    const unsigned short lo = (unsigned short)(w & 0xffffu), hi = (unsigned short)(w >> 16);
    asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"(lo));
    asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"(hi));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_WARP, x, o));
    return x;
}

/// Rotate the row held in `stage` (f32 [HEAD_DIM]) into x (lane's channels) at table row `pos`.
__device__ __forceinline__ void rope_row(float (&x)[LANE_D], const float* stage,
                                         const float* __restrict__ rope_cos,
                                         const float* __restrict__ rope_sin, long long pos, int lane) {
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        const int d = c * WARP_SIZE + lane;
        if (d < ROT_DIM) {
            const int half = ROT_DIM / 2;
            const int f = d < half ? d : d - half;
            const int partner = d < half ? d + half : d - half;
            const float sign = d < half ? -1.0f : 1.0f;
            const float cs = rope_cos[pos * (ROT_DIM / 2) + f];
            const float sn = rope_sin[pos * (ROT_DIM / 2) + f];
            x[c] = x[c] * cs + sign * stage[partner] * sn;
        }
    }
}

/// acc[c] += p * v[c] over this lane's LANE_D contiguous elements of one V row.
__device__ __forceinline__ void pv_step(float p, const elem_t* v, float (&acc)[LANE_D]) {
    unsigned w[LANE_D / 2];
    if constexpr (LANE_D == 8) {
        const uint4 x = *reinterpret_cast<const uint4*>(v);
        w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
    } else if constexpr (LANE_D == 4) {
        const uint2 x = *reinterpret_cast<const uint2*>(v);
        w[0] = x.x; w[1] = x.y;
    } else {
#pragma unroll
        for (int k = 0; k < LANE_D / 2; ++k) w[k] = reinterpret_cast<const unsigned*>(v)[k];
    }
#pragma unroll
    for (int k = 0; k < LANE_D / 2; ++k) {
        float a, b;
        unpack2((elem_t*)nullptr, w[k], a, b);
        acc[2 * k] = fmaf(p, a, acc[2 * k]);
        acc[2 * k + 1] = fmaf(p, b, acc[2 * k + 1]);
    }
}

extern "C" __global__ void __launch_bounds__(MAX_WARPS * WARP_SIZE) flashdec_bf16_hd256_ropehalf256_w8(
    const elem_t* __restrict__ q,
    const elem_t* __restrict__ k_new,
    const elem_t* __restrict__ v_new,
    elem_t* __restrict__ k_cache,
    elem_t* __restrict__ v_cache,
    const int* __restrict__ cache_seqlens,
    const float* __restrict__ rope_cos,
    const float* __restrict__ rope_sin,
    float* __restrict__ o_part,
    float* __restrict__ lse_part,
    int batch,
    int batch_offset,
    int max_batch,
    int num_heads,
    int num_groups,
    int num_splits,
    float softmax_scale,
    int window_left,
    int window_right)
{
    // Ring of STAGES x {K, V} tiles, each elem_t [TILE][HEAD_DIM].
    extern __shared__ __align__(16) unsigned char kv_ring[];
    __shared__ __align__(16) elem_t k_row[HEAD_DIM];
    __shared__ __align__(16) elem_t v_row[HEAD_DIM];
    __shared__ float stage[MAX_WARPS][HEAD_DIM];
    __shared__ float p_s[MAX_WARPS][TILE];

    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    const int split = blockIdx.x;
    const int g = blockIdx.y;
    const int b = blockIdx.z;
    const int per = num_heads / num_groups;
    const long long pos = cache_seqlens[b];
    const int sk = (int)pos + 1;
    const long long slot = (long long)batch_offset + b;

    // 1. The new key (rotated) and value of this group, into shared memory.
    if (warp == 0) {
        const elem_t* kn = k_new + ((long long)b * num_groups + g) * HEAD_DIM;
        const elem_t* vn = v_new + ((long long)b * num_groups + g) * HEAD_DIM;
        float x[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            x[c] = load_elem(kn + c * WARP_SIZE + lane);
            stage[0][c * WARP_SIZE + lane] = x[c];
        }
        __syncwarp();
        rope_row(x, stage[0], rope_cos, rope_sin, pos, lane);
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) {
            store_elem(&k_row[c * WARP_SIZE + lane], x[c]);
            v_row[c * WARP_SIZE + lane] = vn[c * WARP_SIZE + lane];
        }
    }
    __syncthreads();

    int lo, hi;
    visible_range(0, 1, sk, window_left, window_right, &lo, &hi);
    const int chunk = (hi - lo + num_splits - 1) / num_splits;
    const int s_lo = min(hi, lo + split * chunk);
    const int s_hi = min(hi, s_lo + chunk);
    const int owner = (pos >= lo && pos < hi && chunk > 0) ? (int)((pos - lo) / chunk) : 0;

    // 2. Append (the owning split only; every block reads the new row from smem).
    if (split == owner) {
        const long long off = ((pos * max_batch + slot) * num_groups + g) * HEAD_DIM;
        for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
            k_cache[off + d] = k_row[d];
            v_cache[off + d] = v_row[d];
        }
    }

    // 3. Attention over [s_lo, s_hi).
    const int n_tiles = (s_hi - s_lo + TILE - 1) / TILE;
    const long long row_stride = (long long)max_batch * num_groups * HEAD_DIM;
    const elem_t* k_base = k_cache + (slot * num_groups + g) * HEAD_DIM;
    const elem_t* v_base = v_cache + (slot * num_groups + g) * HEAD_DIM;
    elem_t* ring = reinterpret_cast<elem_t*>(kv_ring);
    // Queue tile t's copies into ring slot t % STAGES (row pos from smem) and commit a group
    // (an empty one past the last tile, so the wait counts stay uniform).
    auto load_tile = [&](int t) {
        if (t < n_tiles) {
            const int t0 = s_lo + t * TILE;
            const int n = min(TILE, s_hi - t0);
            elem_t* ks = ring + (t % STAGES) * (2 * TILE * HEAD_DIM);
            elem_t* vs = ks + TILE * HEAD_DIM;
            for (int e = threadIdx.x; e < n * CHUNKS; e += blockDim.x) {
                const int jj = e / CHUNKS, c = e % CHUNKS;
                const long long j = t0 + jj;
                const int so = jj * HEAD_DIM + c * 8;
                if (j == pos) {
                    *reinterpret_cast<uint4*>(ks + so) = *reinterpret_cast<const uint4*>(k_row + c * 8);
                    *reinterpret_cast<uint4*>(vs + so) = *reinterpret_cast<const uint4*>(v_row + c * 8);
                } else {
                    const long long go = j * row_stride + c * 8;
                    cp_async16(smem_addr(ks + so), k_base + go);
                    cp_async16(smem_addr(vs + so), v_base + go);
                }
            }
        }
        cp_async_commit();
    };

    const float scale_log2 = softmax_scale * LOG2E;
    const int sub = lane / LPK;          // key of the lane's group within a warp step
    const int ql = lane % LPK;           // lane within its key group
    const int my_key = sub + KPW * ql;   // tile row whose score the lane holds after reduction
    for (int r0 = 0; r0 < per; r0 += warps) {
        const int hl = r0 + warp;
        const bool active = hl < per;
        const int h = g * per + (active ? hl : 0);
        float qc[CPL * 8];
        {
            const elem_t* qr = q + ((long long)b * num_heads + h) * HEAD_DIM;
            float qv[LANE_D];
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) {
                qv[c] = load_elem(qr + c * WARP_SIZE + lane);
                stage[warp][c * WARP_SIZE + lane] = qv[c];
            }
            __syncwarp();
            rope_row(qv, stage[warp], rope_cos, rope_sin, pos, lane);
            __syncwarp();
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) stage[warp][c * WARP_SIZE + lane] = qv[c];
            __syncwarp();
#pragma unroll
            for (int cc = 0; cc < CPL; ++cc)
#pragma unroll
                for (int e = 0; e < 8; ++e) qc[cc * 8 + e] = stage[warp][(ql + LPK * cc) * 8 + e] * scale_log2;
        }
        float acc[LANE_D];
#pragma unroll
        for (int c = 0; c < LANE_D; ++c) acc[c] = 0.0f;
        float m = neg_inf(), l = 0.0f;   // l: this lane's part of the row sum

        __syncthreads();   // the previous round is done with every ring slot
#pragma unroll
        for (int t = 0; t < STAGES - 1; ++t) load_tile(t);
        for (int t = 0; t < n_tiles; ++t) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();   // tile t landed for all threads; slot (t - 1) % STAGES is free
            load_tile(t + STAGES - 1);
            if (!active) continue;
            const int n = min(TILE, s_hi - (s_lo + t * TILE));
            const elem_t* ks = ring + (t % STAGES) * (2 * TILE * HEAD_DIM);
            const elem_t* vs = ks + TILE * HEAD_DIM;
            float s[LPK];
#pragma unroll
            for (int i = 0; i < LPK; ++i) {
                const elem_t* kr = ks + (sub + KPW * i) * HEAD_DIM;
                float d = 0.0f;
#pragma unroll
                for (int cc = 0; cc < CPL; ++cc) {
                    const uint4 w = *reinterpret_cast<const uint4*>(kr + (ql + LPK * cc) * 8);
                    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        float a, bb;
                        unpack2((elem_t*)nullptr, ws[k], a, bb);
                        d = fmaf(qc[cc * 8 + 2 * k], a, d);
                        d = fmaf(qc[cc * 8 + 2 * k + 1], bb, d);
                    }
                }
                s[i] = d;
            }
            // Transposed reduction over the LPK lanes of each key group: each step halves the
            // values per lane; the lane ends with the full score of tile row my_key.
#pragma unroll
            for (int step = 0; step < LOG_LPK; ++step) {
                const int nv = LPK >> step;
                const int o = nv / 2;
                const bool upper = (lane & o) != 0;
#pragma unroll
                for (int k = 0; k < nv / 2; ++k) {
                    const float keep = upper ? s[k + nv / 2] : s[k];
                    const float send = upper ? s[k] : s[k + nv / 2];
                    s[k] = keep + __shfl_xor_sync(FULL_WARP, send, o);
                }
            }
            const float sc = my_key < n ? s[0] : neg_inf();
            const float m_new = fmaxf(m, warp_max(sc));
            const float corr = exp2f(m - m_new);
            const float p = exp2f(sc - m_new);
            l = l * corr + p;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) acc[c] *= corr;
            m = m_new;
            p_s[warp][my_key] = p;
            __syncwarp();
            const elem_t* vr = vs + lane * LANE_D;
            if (n == TILE) {
#pragma unroll
                for (int jj = 0; jj < TILE; ++jj) pv_step(p_s[warp][jj], vr + jj * HEAD_DIM, acc);
            } else {
                for (int jj = 0; jj < n; ++jj) pv_step(p_s[warp][jj], vr + jj * HEAD_DIM, acc);
            }
            __syncwarp();
        }
        l = warp_sum(l);
        if (active) {
            const long long row = ((long long)split * batch + b) * num_heads + h;
            const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c) o_part[row * HEAD_DIM + lane * LANE_D + c] = acc[c] * inv_l;
            if (lane == 0) lse_part[row] = l > 0.0f ? m + log2f(l) : neg_inf();
        }
    }
    cp_async_wait<0>();
}

/// Warps per block of the merge kernel (each a strided subset of the splits).
constexpr int MERGE_WARPS = 4;

extern "C" __global__ void __launch_bounds__(MERGE_WARPS * WARP_SIZE) flashdec_bf16_hd256_ropehalf256_w8_merge(
    const float* __restrict__ o_part,
    const float* __restrict__ lse_part,
    elem_t* __restrict__ out,
    float* __restrict__ lse,
    const float* __restrict__ sinks,
    const elem_t* __restrict__ gate,
    int batch,
    int num_heads,
    int num_splits)
{
    __shared__ float part[MERGE_WARPS][HEAD_DIM];
    __shared__ float part_total[MERGE_WARPS];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int b = blockIdx.x;
    const int h = blockIdx.y;
    const long long row = (long long)b * num_heads + h;
    const long long split_stride = (long long)batch * num_heads;
    // Every warp finds the largest split LSE (lanes strided over the splits).
    float mx = neg_inf();
    for (int s = lane; s < num_splits; s += WARP_SIZE) mx = fmaxf(mx, lse_part[s * split_stride + row]);
    mx = warp_max(mx);
    const bool any = mx != neg_inf();
    (void)sinks;
    const float sink = neg_inf();
    const float m = fmaxf(mx, sink);
    float total = 0.0f;
    float acc[LANE_D];
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) acc[c] = 0.0f;
    if (any) {
#pragma unroll 4
        for (int s = warp; s < num_splits; s += MERGE_WARPS) {
            const float ls = lse_part[s * split_stride + row];
            const float w = ls == neg_inf() ? 0.0f : exp2f(ls - m);
            total += w;
#pragma unroll
            for (int c = 0; c < LANE_D; ++c)
                acc[c] = fmaf(w, o_part[(s * split_stride + row) * HEAD_DIM + c * WARP_SIZE + lane], acc[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) part[warp][c * WARP_SIZE + lane] = acc[c];
    if (lane == 0) part_total[warp] = total;
    __syncthreads();
    if (warp != 0) return;
    total = any || sink != neg_inf() ? exp2f(sink - m) : 0.0f;
#pragma unroll
    for (int w = 0; w < MERGE_WARPS; ++w) total += part_total[w];
    const float inv = any ? 1.0f / total : 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_D; ++c) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < MERGE_WARPS; ++w) a += part[w][c * WARP_SIZE + lane];
        float o = a * inv;
        store_elem(out + row * HEAD_DIM + c * WARP_SIZE + lane, o);
    }
    (void)gate;
    if (lane == 0) lse[(long long)h * batch + b] = any ? (m + log2f(total)) * LN2 : neg_inf();
}
