// Kernel `{{ key }}`: attention forward, FlashAttention-2 style, rendered from templates/prefill_sm80.cu.
// dtype {{ dtype }}, head dim {{ head_dim }}, mask {{ mask }}, window {{ has_window }},
// sinks {{ sinks }}, output gate {{ has_gate }}.
// Tile: BLOCK_M {{ block_m }} query rows x BLOCK_N {{ block_n }} keys per step, {{ warps }} warps
// ({{ block_m }} / {{ warps }} rows each), {{ stages }} K/V shared-memory stages.
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
// Mask tensor {{ mask_tensor }}, additive bias {{ has_bias }} (as the simple kernel): `mask` uint8,
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
//        cu_seqlens_k is ignored. Paged: {{ paged_kv }}.
//   lse: f32 [num_heads, rows] natural log, rows = seqlen_q * batch (padded, row = i * batch + b)
//        or total_q (packed, row = token index); -inf for a row that sees no key.
// GQA by indexing: head h reads group h / (num_heads / num_groups).
//
// Per block: Q tile -> shared memory (cp.async), K/V tiles stream through a STAGES-deep
// cp.async ring (K and V in separate commit groups, so QK^T starts when K lands). S = Q K^T
// and O += P V run on mma.sync m16n8k16 ({{ dtype }} in, f32 accumulate), operands through
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

{% include "partials/types.cu" %}
{% include "partials/mask.cu" %}
{%- set may_mask = (mask != "no_mask" or has_window or mask_tensor or has_bias) and not paged_kv %}
{%- if may_mask %}
{% include "partials/attend.cu" %}
{%- endif %}

constexpr int BLOCK_M = {{ block_m }};
constexpr int BLOCK_N = {{ block_n }};
constexpr int WARPS = {{ warps }};
constexpr int STAGES = {{ stages }};
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
{%- if head_dim >= 256 and mask != "no_mask" %}
constexpr int PF_WANT = 1;
{%- else %}
constexpr int PF_WANT = 4;
{%- endif %}
constexpr int QK_PF = PF_WANT < NI / 2 ? PF_WANT : NI / 2;
constexpr int PV_PF = PF_WANT < KN * (DN / 2) ? PF_WANT : KN * (DN / 2);
static_assert(QK_PF >= 1 && QK_PF <= NI / 2, "Q K^T prefetch keeps at most two k16 steps of Q live");
static_assert(PV_PF >= 1 && PV_PF <= KN * (DN / 2), "P V prefetch stays inside the tile");

{% include "partials/cp_async.cu" %}
{% include "partials/mma_sm80.cu" %}
{% include "partials/pack.cu" %}

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

{% include "partials/prefill_common.cu" %}

extern "C" __global__ void __launch_bounds__(THREADS) {{ key }}(
{% include "partials/prefill_args.cu" %}
    extern __shared__ uint4 smem_raw[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sK = sQ + Q_ELEMS;
    elem_t* sV = sK + STAGES * KV_ELEMS;

    const int tid = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int gq = lane / 4;  // row within an 8-row group of an mma fragment
    const int tq = lane % 4;  // column pair within an mma fragment
{% include "partials/prefill_block.cu" %}

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
{%- if sinks == "off_by_one" %}
            m_run[mi][hh] = 0.0f;  // zero-logit sink column
            l_part[mi][hh] = tq == 0 ? 1.0f : 0.0f;
{%- elif sinks == "learnable" %}
            m_run[mi][hh] = sinks[h] * FAST_LOG2E;  // learned sink logit (post-scale units)
            l_part[mi][hh] = tq == 0 ? 1.0f : 0.0f;
{%- else %}
            m_run[mi][hh] = neg_inf();
            l_part[mi][hh] = 0.0f;
{%- endif %}
            m_vis[mi][hh] = neg_inf();
        }
    }
{%- if sinks == "none" %}
    (void)sinks;
{%- endif %}

{%- if paged_kv %}
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
{%- else %}
    (void)block_table; (void)block_size; (void)max_blocks_per_seq;
    auto load_kv = [&](elem_t* dst, const elem_t* __restrict__ src, int n0) {
        load_tile<BLOCK_N>(dst, src + kv_base + (long long)n0 * kv_row_stride, kv_row_stride, sk - n0, tid);
    };
{%- endif %}

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

{%- if mask_tensor or has_bias %}
        // Mask tensor / additive bias, per element on every tile. Rows at or past sq and keys
        // at or past sk are never read (those keys are already -inf from the range mask).
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int i = m0 + warp_row0 + mi * 16 + gq + 8 * hh;
                if (i < sq) {
{%- if mask_tensor %}
                    const unsigned char* mrow = mask + (long long)b * mask_stride_b +
                                                (long long)h * mask_stride_h + (long long)i * mask_stride_q;
{%- endif %}
{%- if has_bias %}
                    const float* brow = bias + (long long)b * bias_stride_b + (long long)h * bias_stride_h +
                                        (long long)i * bias_stride_q;
{%- endif %}
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = n0 + ni * 8 + 2 * tq + e;
                            if (j < sk) {
                                float x = s[mi][ni][2 * hh + e];
{%- if has_bias %}
                                // Range-masked keys stay -inf whatever the bias holds there.
                                x = x == neg_inf() ? x
                                    : biased_logit_log2(x * softmax_scale, brow[(long long)j * bias_stride_k]);
{%- endif %}
{%- if mask_tensor %}
                                if (mrow[(long long)j * mask_stride_k] != 0) x = neg_inf();
{%- endif %}
                                s[mi][ni][2 * hh + e] = x;
                            }
                        }
                    }
                }
            }
        }
{%- endif %}

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
{%- if sinks == "none" %}
            if (row_ok && tq == 0)
                lse[(long long)h * total_q + tok] =
                    any ? (m_run[mi][hh] + __log2f(l)) * FAST_LN2 : neg_inf();
{%- else %}
            // The sink column keeps a fully masked row non-empty: its LSE is the sink logit.
            if (row_ok && tq == 0) lse[(long long)h * total_q + tok] = (m_run[mi][hh] + __log2f(l)) * FAST_LN2;
{%- endif %}
            if (row_ok) head_max = fmaxf(head_max, m_vis[mi][hh]);
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                float o0 = o[mi][dn][2 * hh] * inv;
                float o1 = o[mi][dn][2 * hh + 1] * inv;
{%- if has_gate %}
                if (row_ok) {
                    const elem_t* gp = gate + (tok * num_heads + h) * HEAD_DIM + dn * 8 + 2 * tq;
                    o0 *= 1.0f / (1.0f + expf(-load_elem(gp)));
                    o1 *= 1.0f / (1.0f + expf(-load_elem(gp + 1)));
                }
{%- endif %}
                *reinterpret_cast<unsigned*>(sQ + r * SROW + dn * 8 + 2 * tq) = pack2(o0, o1);
            }
        }
    }
{%- if not has_gate %}
    (void)gate;
{%- endif %}
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
