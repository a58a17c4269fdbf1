{% import "partials/wgmma_ops.cu" as ops -%}
// Kernel `{{ key }}`: attention forward on Hopper's warpgroup MMA, rendered from
// templates/prefill_sm90.cu. dtype {{ dtype }}, head dim {{ head_dim }}, mask {{ mask }}, window
// {{ has_window }}, sinks {{ sinks }}, output gate {{ has_gate }}, mask tensor {{ mask_tensor }},
// additive bias {{ has_bias }}, paged K/V {{ paged_kv }}.
// Tile: BLOCK_M {{ block_m }} query rows (one 64-row warpgroup each) x BLOCK_N {{ block_n }} keys
// per step, {{ warps }} warps, {{ stages }} K/V shared-memory stages. Needs sm_90a (wgmma).
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
//   S = Q K^T : wgmma m64n{{ block_n }}k16, A = Q and B = K from shared memory (both K-major),
//               HEAD_DIM / 16 instructions into 4 * BLOCK_N / 8 f32 registers per thread;
//   softmax   : the sm80 kernel's online softmax on the accumulator (its fragment layout is
//               mma.sync's m16n8 layout per warp: warp w of the group owns rows 16w..16w+15);
//   O += P V  : wgmma m64n{{ head_dim }}k16 with A = P from registers (the accumulator
//               repacked to {{ dtype }}, mma.sync's A layout) and B = V from shared memory,
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

{% include "partials/cp_async.cu" %}

{% include "partials/wgmma_sm90.cu" %}

/// d (+)= A B, m64n{{ block_n }}k16: A (64 x 16, K-major) and B (16 x BLOCK_N, K-major) from shared
/// memory; `accumulate == 0` overwrites d.
{{ ops::ss(name="wgmma_qk", acc="NI", n=block_n, tiles=s_tiles, dtype=dtype, trans_a=0, trans_b=0, pred=true) }}

/// d += A B, m64n{{ head_dim }}k16: A (64 x 16) from registers (mma.sync's A fragment per
/// warp), B (16 x HEAD_DIM) from shared memory, MN-major (transposed).
{{ ops::rs(name="wgmma_pv", acc="DN", n=head_dim, tiles=o_tiles, dtype=dtype) }}

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

{%- if tma %}

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
{%- endif %}

{% include "partials/pack.cu" %}

{% include "partials/prefill_common.cu" %}

extern "C" __global__ void __launch_bounds__(THREADS, 1) {{ key }}(
{% include "partials/prefill_args.cu" %}
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
{% include "partials/prefill_block.cu" %}
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
{%- if tma and paged_kv %}
    // A paged pool's warp-specialized kernel loads by TMA only (the host refuses to launch it
    // without maps): no cp.async producer is compiled in.
    if (tma_maps.enabled == 0) __trap();
    constexpr bool use_tma = true;
{%- else %}
    const bool use_tma = {% if tma %}tma_maps.enabled != 0{% else %}false{% endif %};
{%- endif %}
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
{%- if sinks == "off_by_one" %}
        m_run[hh] = 0.0f;
        l_part[hh] = tq == 0 ? 1.0f : 0.0f;
{%- elif sinks == "learnable" %}
        m_run[hh] = sinks[h] * FAST_LOG2E;
        l_part[hh] = tq == 0 ? 1.0f : 0.0f;
{%- else %}
        m_run[hh] = neg_inf();
        l_part[hh] = 0.0f;
{%- endif %}
        m_vis[hh] = neg_inf();
    }
{%- if sinks == "none" %}
    (void)sinks;
{%- endif %}

{%- if paged_kv %}
    (void)kv_base; (void)kv_row_stride;
    const int* __restrict__ bt_row = block_table + (long long)b * max_blocks_per_seq;
    const int bs_shift = __ffs(block_size) - 1;
    const long long pool_row_stride = (long long)num_groups * HEAD_DIM;
    auto load_kv = [&](unsigned dst, const elem_t* __restrict__ pool, int n0) {
        if (block_size >= BLOCK_N) {
            const long long row0 =
                ((long long)bt_row[n0 >> bs_shift] << bs_shift) + (n0 & (block_size - 1));
            load_tile<BLOCK_N, !WS>(dst, pool + row0 * pool_row_stride + (long long)grp * HEAD_DIM,
                               pool_row_stride, sk - n0, ltid);
            return;
        }
#pragma unroll
        for (int c = ltid; c < BLOCK_N * CHUNKS; c += LOADERS) {
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
            cp_async16(dst + sw_off<BLOCK_N>(r, ch), g, ok);
        }
    };
{%- else %}
    (void)block_table; (void)block_size; (void)max_blocks_per_seq;
    auto load_kv = [&](unsigned dst, const elem_t* __restrict__ src, int n0) {
        load_tile<BLOCK_N, !WS>(dst, src + kv_base + (long long)n0 * kv_row_stride, kv_row_stride, sk - n0,
                                ltid);
    };
{%- endif %}

    if (WS && warp >= CONSUMER_WARPS) {
        // Producer warpgroup: Q, then every K/V tile into its stage once the consumers have
        // released it (tile t's stage is released for tile t + STAGES).
{%- if tma %}
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
{%- if not paged_kv %}
        const int k_slot = (int)k_tok0 % (int)k_step, k_row0 = (int)k_tok0 / (int)k_step;
{%- endif %}
        __syncwarp();  // setmaxnreg is .sync.aligned: the warp converged after lane 0's branch
{%- endif %}
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
{%- if tma %}
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
{%- if paged_kv %}
                    // A paged pool: one box per pool block of the tile (min(block_size, BLOCK_N)
                    // rows, 16-row multiples, so every box starts on the swizzle's period),
                    // lane i issuing the i-th after lane 0 has announced the tile's bytes. Rows
                    // past the sequence read the sequence's last block (never a block-table
                    // entry past it): their V rows are zeroed below, their K scores masked.
                    if (ltid == 0) mbar_arrive_expect_tx(bar, 2 * KV_BYTES);
                    __syncwarp();
                    const int rb = min(block_size, BLOCK_N);
                    for (int r = ltid * rb; r < BLOCK_N; r += WARP_SIZE * rb) {
                        const int j = n0 + r < sk ? n0 + r : (sk - 1) & ~(rb - 1);
                        // (From the parameters, not bt_row / bs_shift: the producer's 40
                        // registers at head dim 256.)
                        const int sh = __ffs(block_size) - 1;
                        const int row = (block_table[(long long)b * max_blocks_per_seq + (j >> sh)] << sh) +
                                        (j & (block_size - 1));
#pragma unroll
                        for (int pn = 0; pn < HEAD_DIM / 64; ++pn) {
                            tma_load_4d(sK_addr + st * KV_BYTES + pn * BLOCK_N * 128 + r * 128, tma_maps.k, pn * 64,
                                        grp, 0, row, bar);
                            tma_load_4d(sV_addr + st * KV_BYTES + pn * BLOCK_N * 128 + r * 128, tma_maps.v, pn * 64,
                                        grp, 0, row, bar);
                        }
                    }
{%- else %}
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
{%- endif %}
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
{%- endif %}
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
            if ({% if tma %}tma_maps.enabled == 0{% else %}true{% endif %})
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

{%- if mask_tensor or has_bias %}
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int i = m0 + warp_row0 + gq + 8 * hh;
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
                            float x = s[ni][2 * hh + e];
{%- if has_bias %}
                            x = x == neg_inf() ? x
                                : biased_logit_log2(x * softmax_scale, brow[(long long)j * bias_stride_k]);
{%- endif %}
{%- if mask_tensor %}
                            if (mrow[(long long)j * mask_stride_k] != 0) x = neg_inf();
{%- endif %}
                            s[ni][2 * hh + e] = x;
                        }
                    }
                }
            }
        }
{%- endif %}

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
{%- if sinks == "none" %}
        if (row_ok && tq == 0)
            lse[(long long)h * total_q + tok] = any ? (m_run[hh] + __log2f(l)) * FAST_LN2 : neg_inf();
{%- else %}
        if (row_ok && tq == 0) lse[(long long)h * total_q + tok] = (m_run[hh] + __log2f(l)) * FAST_LN2;
{%- endif %}
        if (row_ok) head_max = fmaxf(head_max, m_vis[hh]);
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
            float o0 = o[dn][2 * hh] * inv;
            float o1 = o[dn][2 * hh + 1] * inv;
{%- if has_gate %}
            if (row_ok) {
                const elem_t* gp = gate + (tok * num_heads + h) * HEAD_DIM + dn * 8 + 2 * tq;
                o0 *= 1.0f / (1.0f + expf(-load_elem(gp)));
                o1 *= 1.0f / (1.0f + expf(-load_elem(gp + 1)));
            }
{%- endif %}
            *reinterpret_cast<unsigned*>(smem + sw_off<BLOCK_M>(r, dn) + 4 * tq) = pack2(o0, o1);
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
