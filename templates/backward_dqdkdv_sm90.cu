{% import "partials/wgmma_ops.cu" as ops -%}
// Kernel `{{ key }}`: attention backward in one pass on Hopper's warpgroup MMA, rendered from
// templates/backward_dqdkdv_sm90.cu. dtype {{ dtype }}, head dim {{ head_dim }}, mask {{ mask }},
// window {{ has_window }}, bias {{ has_bias }}. Needs sm_90a (wgmma).
// Tile: BLOCK_N {{ block_n }} keys per block x BLOCK_M {{ block_m }} queries per step, two warpgroups
// ({{ warps }} warps){% if p_smem %} sharing the keys (head dim 256, P_SMEM below){% else %} of 64 keys each{% endif %}.
//
// The same schedule, launch, parameters and math as templates/backward_dqdkdv_sm80.cu (the
// fast, non-deterministic mode: grid (ceil(max_seqlen_k / BLOCK_N), num_groups, batch); a block
// owns one KV tile of one group and loops over every query head of the group and every query
// tile that sees it; dQ added to the f32 `dq_accum` with atomics, its columns permuted in
// groups of 16 (step 6); `<key>_dq_convert` scales, un-permutes and rounds it), with the
// products on wgmma and the transposed formulation of FlashAttention-3's
// backward, so that no product needs a register transpose:
//   S^T  = K Q^T   : wgmma m64n{{ st_n }}k16, A = 64 rows of K, B = {% if p_smem %}this warpgroup's half of
//                    the step's queries of {% endif %}Q, both from shared memory, K-major;
//   dP^T = V dO^T  : the same with V and dO;
//   P^T = exp2(S^T * scale * log2e - LSE), dS^T = P^T o (dP^T - D) in registers (f32; keys are
//   the accumulator's rows, queries its columns);
{%- if p_smem %}
//   dV  += P^T dO  : P^T and dS^T go to shared memory ({{ dtype }}, swizzled, keys as rows), then
//                    wgmma m64n{{ kv_n }}k16 with A = P^T (K-major) and B = this warpgroup's
//                    half of dO's columns (MN-major), both from shared memory;
{%- else %}
//   dV  += P^T dO  : wgmma m64n{{ kv_n }}k16, A = P^T from registers (the accumulator
//                    repacked to {{ dtype }}: mma.sync's A layout, as the forward's P), B = dO from
//                    shared memory, MN-major;
{%- endif %}
//   dK  += dS^T Q  : the same with dS^T and Q;
//   dQ_partial = dS K : dS^T goes to shared memory ({{ dtype }}, swizzled, keys as rows); wgmma
//                    m64n{{ dq_n }}k16 with A = dS (M-major: a transposed read of dS^T) and B = K
//                    (MN-major), both from shared memory. Head dims 128 and 256: each warpgroup
//                    takes half the head-dim columns of all 64 queries; head dim 64 (128 queries
//                    per step): each warpgroup takes 64 queries, every column.
// Schedule ({{ stages }} in the tile): 2 = per step, S^T and dP^T in flight together, then dV and
// dK issued together after dS^T (and dQ); 3 (OVERLAP) = dV issued right after P^T, before
// the wait for dP^T, so the exponentials run under dP^T's product (see step 3), dS^T from the
// f32 P while dV runs; 4 (ANCHOR) = dV issued there too, then one wait for dP^T and dV, and dS^T from the
// packed P as in 2 (the f32 P dies at the packing: fewer registers than 3). In every schedule
// dQ's product is issued before dK's (and, in 2, dV's), so that dQ's reductions run under them.
// Q, dO (two buffers), K and V live in shared memory in wgmma's 128-byte-swizzled layout
// (templates/prefill_sm90.cu), Q/dO/LSE/D by cp.async one step ahead.
// Dynamic shared memory: SMEM_BYTES = (2 * BLOCK_N + 4 * BLOCK_M) * HEAD_DIM * 2 (K, V, two
// buffers of Q and dO) + BLOCK_N * BLOCK_M * 2 (dS^T; twice with P_SMEM: P^T too) + 16 *
// BLOCK_M (two buffers of LSE and D) + 1024 (alignment of the tiles to the swizzle's 1024-byte
// period).

{% include "partials/types.cu" %}
{% include "partials/mask.cu" %}
{% include "partials/params_bwd.cu" %}
{% include "partials/cp_async.cu" %}
{% include "partials/pack.cu" %}
{% include "partials/backward_common.cu" %}

constexpr int BLOCK_M = {{ block_m }};
constexpr int BLOCK_N = {{ block_n }};
constexpr int WARPS = {{ warps }};
constexpr int THREADS = WARPS * WARP_SIZE;
// P_SMEM (head dim 256): both warpgroups take all 64 keys of the tile; S^T / dP^T split the
// step's queries between them, dK / dV / dQ the head dim; P^T and dS^T meet in shared memory.
constexpr bool P_SMEM = {{ p_smem }};
constexpr int ST_N = P_SMEM ? BLOCK_M / 2 : BLOCK_M;  // queries of S^T per warpgroup
constexpr int KV_N = P_SMEM ? HEAD_DIM / 2 : HEAD_DIM;  // head-dim columns of dK / dV per warpgroup
constexpr int SN = ST_N / 8;         // n8 tiles of S^T / dP^T per thread (queries)
constexpr int KQ = BLOCK_M / 16;     // k16 steps of dV / dK (queries)
constexpr int PK = SN / 2;           // k16 chunks of P^T / dS^T this thread holds (queries)
constexpr int DN = KV_N / 8;         // n8 tiles of dK / dV (head dim)
constexpr int KD = HEAD_DIM / 16;    // k16 steps of S^T / dP^T (head dim)
constexpr int KN = BLOCK_N / 16;     // k16 steps of dQ (keys)
constexpr int DQ_N = {{ dq_n }};     // head-dim columns of dQ per warpgroup
constexpr int QN = DQ_N / 8;         // n8 tiles of dQ
constexpr bool DQ_SPLIT_M = DQ_N == HEAD_DIM;  // warpgroups split dQ's queries (else its columns)
constexpr int CHUNKS = HEAD_DIM / 8; // 16-byte chunks per row
constexpr int Q_BYTES = BLOCK_M * HEAD_DIM * 2;
constexpr int KV_BYTES = BLOCK_N * HEAD_DIM * 2;
constexpr int DS_BYTES = BLOCK_N * BLOCK_M * 2;
constexpr int LOADERS = THREADS;     // every thread loads (partials/wgmma_sm90.cu)
static_assert(WARPS == 8 && (P_SMEM ? BLOCK_N == 64 && BLOCK_M == 64 : BLOCK_N == 128),
              "two warpgroups of 64 keys, or (P_SMEM) two warpgroups sharing 64 keys");
static_assert(!P_SMEM || {{ stages }} == 2, "the overlapped schedules keep P in registers");
static_assert({{ stages }} >= 2 && {{ stages }} <= 4, "schedules 2, 3 and 4");
static_assert(HEAD_DIM % 64 == 0 && BLOCK_M % 64 == 0, "128-byte swizzle panels of 64 elements");
static_assert(DQ_SPLIT_M ? BLOCK_M == 128 : (BLOCK_M == 64 && DQ_N * 2 == HEAD_DIM && DQ_N % 64 == 0),
              "dQ: 64 queries x every column, or 64 queries x half the columns, per warpgroup");

{% include "partials/wgmma_sm90.cu" %}

/// d (+)= A B, m64n{{ st_n }}k16 (S^T, dP^T): A (64 x 16) and B (16 x ST_N) from shared
/// memory, both K-major; `accumulate == 0` overwrites d.
{{ ops::ss(name="wgmma_st", acc="SN", n=st_n, tiles=st_tiles, dtype=dtype, trans_a=0, trans_b=0, pred=true) }}

{%- if p_smem %}
/// d += A B, m64n{{ kv_n }}k16 (dV, dK): A (64 x 16, P^T or dS^T) from shared memory,
/// K-major, B (16 x KV_N, dO or Q) from shared memory, MN-major.
{{ ops::ss(name="wgmma_kv_ss", acc="DN", n=kv_n, tiles=kv_tiles, dtype=dtype, trans_a=0, trans_b=1, pred=false) }}

{%- else %}
/// d += A B, m64n{{ head_dim }}k16 (dV, dK): A (64 x 16) from registers, B (16 x HEAD_DIM) from
/// shared memory, MN-major.
{{ ops::rs(name="wgmma_kv", acc="DN", n=head_dim, tiles=o_tiles, dtype=dtype) }}

{%- endif %}
/// d (+)= A B, m64n{{ dq_n }}k16 (dQ): A (64 x 16) from shared memory M-major (dS, read from the
/// row-major dS^T), B (16 x DQ_N) from shared memory MN-major (K); `accumulate == 0`
/// overwrites d.
{{ ops::ss(name="wgmma_dq", acc="QN", n=dq_n, tiles=dq_tiles, dtype=dtype, trans_a=1, trans_b=1, pred=true) }}

{% include "partials/backward_fused.cu" %}

/// `*dst += (a, b, c, d)` with one 16-byte L2 reduction (`red.global.add.v4.f32`, sm_90),
/// only if `ok` (a literal 1 drops the predicate).
__device__ __forceinline__ void red_add4(float* dst, float a, float b, float c, float d, int ok) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\n"
        "@p red.global.add.v4.f32 [%0], { %1, %2, %3, %4 };\n}\n" ::"l"(dst),
        "f"(a), "f"(b), "f"(c), "f"(d), "r"(ok)
        : "memory");
}

template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) reg_fence(d[j][e]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) {{ key }}(const BwdParams p) {
    extern __shared__ uint4 smem_raw[];
    const unsigned raw_addr = smem_addr(smem_raw);
    const unsigned pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem_raw) + pad;
    const unsigned sK_addr = raw_addr + pad;
    const unsigned sV_addr = sK_addr + KV_BYTES;
    const unsigned sQ_addr = sV_addr + KV_BYTES;     // 2 buffers
    const unsigned sdO_addr = sQ_addr + 2 * Q_BYTES; // 2 buffers
    const unsigned sdS_addr = sdO_addr + 2 * Q_BYTES;
    unsigned char* sdS = smem + (sdS_addr - sK_addr);
    // P_SMEM: P^T after dS^T (same layout); otherwise no P^T tile.
    const unsigned sP_addr = sdS_addr + DS_BYTES;
    unsigned char* sP = smem + (sP_addr - sK_addr);
    float* sL = reinterpret_cast<float*>(sP + (P_SMEM ? DS_BYTES : 0));  // 2 x BLOCK_M, the LSE
    float* sD = sL + 2 * BLOCK_M;                          // 2 x BLOCK_M

{% include "partials/bwd_kv_block.cu" %}
    const int wg = warp / 4;          // keys n0 + wg * 64 .. + 63 (P_SMEM: queries wg * ST_N ..)
    const int key_row0 = (P_SMEM ? 0 : wg * 64) + (warp % 4) * 16;  // this warp's first key in the tile
    const int q_col0 = P_SMEM ? wg * ST_N : 0;  // this warpgroup's first query of S^T
    const int kv_col0 = P_SMEM ? wg * KV_N : 0; // this warpgroup's first dK / dV column
    (void)sP;

    // Step t: query head grp * hpg + t / nm_tiles, query tile mt_begin + t % nm_tiles.
    auto load_step = [&](int t) {
        const int buf = t & 1;
        const int h = grp * hpg + t / nm_tiles;
        const int m0 = (mt_begin + t % nm_tiles) * BLOCK_M;
        const int m_valid = min(BLOCK_M, sq - m0);
        const long long q_base = ((q_tok0 + (long long)m0 * q_step) * num_heads + h) * HEAD_DIM;
        load_tile<BLOCK_M>(sQ_addr + buf * Q_BYTES, p.q + q_base, q_row_stride, m_valid, tid);
        load_tile<BLOCK_M>(sdO_addr + buf * Q_BYTES, p.dout + q_base, q_row_stride, m_valid, tid);
        load_lse_d<BLOCK_M, THREADS>(sL + buf * BLOCK_M, sD + buf * BLOCK_M, p.lse, p.dpsum, h, total_q, q_tok0,
                                     q_step, m0, m_valid, tid);
    };

    load_tile<BLOCK_N>(sK_addr, p.k + kv_base, kv_row_stride, n_valid, tid);
    load_tile<BLOCK_N>(sV_addr, p.v + kv_base, kv_row_stride, n_valid, tid);
    if (nsteps > 0) load_step(0);
    cp_async_commit();

    const float sl2 = p.softmax_scale * BWD_LOG2E;
{%- if has_bias %}
    const float scale_nat = p.softmax_scale;
    (void)sl2;
{%- endif %}
    // This warpgroup's 64 rows of K and V (panel p of a tile at + p * BLOCK_N * 128).
    const unsigned k_wg = sK_addr + (unsigned)(P_SMEM ? 0 : wg * 64 * 128);
    const unsigned v_wg = sV_addr + (unsigned)(P_SMEM ? 0 : wg * 64 * 128);
    // dQ: this warpgroup's 64 queries (a 64-column panel of dS^T) and DQ_N columns of K.
    const unsigned dq_a = sdS_addr + (unsigned)(DQ_SPLIT_M ? wg * BLOCK_N * 128 : 0);
    const unsigned dq_b = sK_addr + (unsigned)(DQ_SPLIT_M ? 0 : wg * (DQ_N / 64) * BLOCK_N * 128);
    const int dq_row0 = DQ_SPLIT_M ? wg * 64 : 0;
    const int dq_col0 = DQ_SPLIT_M ? 0 : wg * DQ_N;

    float dk[DN][4], dv[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dk[dn][e] = 0.0f;
            dv[dn][e] = 0.0f;
        }
    }

    for (int t = 0; t < nsteps; ++t) {
        // Step t's tiles landed and every warp is done with step t - 1 (its buffers, dS^T).
        cp_async_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (t + 1 < nsteps) load_step(t + 1);
        cp_async_commit();

        const int buf = t & 1;
        const int h = grp * hpg + t / nm_tiles;
        const int m0 = (mt_begin + t % nm_tiles) * BLOCK_M;
        const unsigned q_s = sQ_addr + (unsigned)(buf * Q_BYTES);
        const unsigned o_s = sdO_addr + (unsigned)(buf * Q_BYTES);
        const float* lrow = sL + buf * BLOCK_M;
        const float* drow = sD + buf * BLOCK_M;
        // The loop-invariant tile addresses, opaque per step: otherwise the compiler keeps
        // every descriptor built from them live across the loop (64-bit each), and spills.
        unsigned kw = k_wg, vw = v_wg, dqa = dq_a, dqb = dq_b;
        asm volatile("" : "+r"(kw), "+r"(vw), "+r"(dqa), "+r"(dqb));

        // 1. S^T and dP^T, two commit groups: the exponentials of P^T run while dP^T's
        // product is in flight.
        float s[SN][4], dp[SN][4];
        fence_acc(s);
        fence_acc(dp);
        wgmma_fence();
        // Descriptors of the step's tiles: K-major (S^T, dP^T) and MN-major (dV, dK) views.
        const GmmaDesc desc_k = gmma_desc(kw, 16, 1024), desc_v = gmma_desc(vw, 16, 1024);
        const GmmaDesc desc_q = gmma_desc(q_s + (unsigned)(q_col0 * 128), 16, 1024);
        const GmmaDesc desc_o = gmma_desc(o_s + (unsigned)(q_col0 * 128), 16, 1024);
        const GmmaDesc desc_q_mn = gmma_desc(q_s, BLOCK_M * 128, 1024);
        const GmmaDesc desc_o_mn = gmma_desc(o_s, BLOCK_M * 128, 1024);
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            const unsigned a = (unsigned)((kk / 4) * BLOCK_N * 128 + (kk % 4) * 32);
            const unsigned bq = (unsigned)((kk / 4) * BLOCK_M * 128 + (kk % 4) * 32);
            wgmma_st(s, gmma_at(desc_k, a), gmma_at(desc_q, bq), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            const unsigned a = (unsigned)((kk / 4) * BLOCK_N * 128 + (kk % 4) * 32);
            const unsigned bo = (unsigned)((kk / 4) * BLOCK_M * 128 + (kk % 4) * 32);
            wgmma_st(dp, gmma_at(desc_v, a), gmma_at(desc_o, bo), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_acc(s);

        // 2. P^T in place of S^T. Element (ni, 2 * hh + e): key n0 + key_row0 + gq + 8 * hh,
        // query m0 + q_col0 + ni * 8 + 2 * tq + e.
        int lo_last, hi_last, lo_first, hi_first;
        visible_range(min(m0 + BLOCK_M, sq) - 1, sq, sk, window_left, window_right, &lo_last, &hi_last);
        visible_range(m0, sq, sk, window_left, window_right, &lo_first, &hi_first);
        const bool full = m0 + BLOCK_M <= sq && n0 + BLOCK_N <= sk && lo_last <= n0 && hi_first >= n0 + BLOCK_N;
{%- if mask_tensor %}
        const unsigned char* mbase =
            p.mask + (long long)b * p.mask_stride_b + (long long)h * p.mask_stride_h;
{%- endif %}
{%- if has_bias %}
        const float* bbase = p.bias + (long long)b * p.bias_stride_b + (long long)h * p.bias_stride_h;
{%- endif %}
{%- if not mask_tensor and not has_bias %}
        if (full) {
            // Every element visible: no per-element mask arithmetic (a uniform branch; the
            // masked form below, predicated, would otherwise run on every tile).
#pragma unroll
            for (int ni = 0; ni < SN; ++ni) {
                const float2 lse2 = *reinterpret_cast<const float2*>(lrow + q_col0 + ni * 8 + 2 * tq);
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float l2 = lse_log2(e == 0 ? lse2.x : lse2.y);
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh)
                        s[ni][2 * hh + e] = fast_exp2(fmaf(s[ni][2 * hh + e], sl2, -l2));
                }
            }
        } else
{%- endif %}
        {
#pragma unroll
            for (int ni = 0; ni < SN; ++ni) {
                const float2 lse2 = *reinterpret_cast<const float2*>(lrow + q_col0 + ni * 8 + 2 * tq);
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = q_col0 + ni * 8 + 2 * tq + e;  // query within the tile
                    const int i = m0 + c;
                    const float l2 = lse_log2(e == 0 ? lse2.x : lse2.y);
                    int lo = 0, hi = 0;
                    if (!full) {
                        visible_range(i, sq, sk, window_left, window_right, &lo, &hi);
                        if (i >= sq) hi = lo;  // rows past the sequence see nothing
                    }
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int j = n0 + key_row0 + gq + 8 * hh;
                        s[ni][2 * hh + e] = fused_prob(s[ni][2 * hh + e], i, j, lo, hi, full, sq, sk, l2, sl2,
                                                       {% if has_bias %}scale_nat{% else %}0.0f{% endif %},
                                                       {% if mask_tensor %}mbase{% else %}nullptr{% endif %}, {% if has_bias %}bbase{% else %}nullptr{% endif %}, p);
                    }
                }
            }
        }

        // P^T packed to {{ dtype }} (dV's A operand).
{%- if stages != 3 %} The f32 values die here, which keeps the registers within budget
        // at 128 queries per step; dS^T uses the rounded P, as the sm80 kernel does.
{%- endif %}
        unsigned pa[PK][4];
#pragma unroll
        for (int kq = 0; kq < PK; ++kq) {
            pa[kq][0] = pack2(s[2 * kq][0], s[2 * kq][1]);
            pa[kq][1] = pack2(s[2 * kq][2], s[2 * kq][3]);
            pa[kq][2] = pack2(s[2 * kq + 1][0], s[2 * kq + 1][1]);
            pa[kq][3] = pack2(s[2 * kq + 1][2], s[2 * kq + 1][3]);
        }

{%- if stages >= 3 %}
        // OVERLAP / ANCHOR: dV += P^T dO now, a third commit group. Its issue needs every
        // exponential, which keeps them all ahead of the wait for dP^T in the machine code
        // (schedule 2 leaves ptxas free to hoist that wait: it puts 4 of 32 after it at head
        // dim 128, NVRTC 13), and dV's product runs while dS^T is formed.
        fence_acc(dv);
        wgmma_fence();
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq)
            wgmma_kv(dv, pa[kq], gmma_at(desc_o_mn, (unsigned)(kq * 16 * 128)));
        wgmma_commit();
{%- endif %}

        // 3. dS^T = P^T o (dP^T - D) in place of dP^T; P == 0 selects 0 (a masked key's dP,
        // finite or not, never enters dS).
{%- if stages == 3 %} P is the f32 one (pa is an operand of the product in flight).
        wgmma_wait<1>();  // S^T and dP^T done, dV in flight
{%- else %} Tile ni's P pair of row hh is pa[ni / 2][(ni % 2) * 2 + hh].
        wgmma_wait<0>();{% if stages == 4 %}  // dP^T and dV done: pa is free to read{% endif %}
{%- endif %}
        fence_acc(dp);
#pragma unroll
        for (int ni = 0; ni < SN; ++ni) {
            const float2 d2 = *reinterpret_cast<const float2*>(drow + q_col0 + ni * 8 + 2 * tq);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
{%- if stages == 3 %}
                const float2 pr = make_float2(s[ni][2 * hh], s[ni][2 * hh + 1]);
{%- else %}
                const float2 pr = unpack2(pa[ni / 2][(ni % 2) * 2 + hh]);
{%- endif %}
                dp[ni][2 * hh] = pr.x > 0.0f ? pr.x * (dp[ni][2 * hh] - d2.x) : 0.0f;
                dp[ni][2 * hh + 1] = pr.y > 0.0f ? pr.y * (dp[ni][2 * hh + 1] - d2.y) : 0.0f;
            }
        }
{%- if not p_smem %}
        unsigned da[PK][4];
#pragma unroll
        for (int kq = 0; kq < PK; ++kq) {
            da[kq][0] = pack2(dp[2 * kq][0], dp[2 * kq][1]);
            da[kq][1] = pack2(dp[2 * kq][2], dp[2 * kq][3]);
            da[kq][2] = pack2(dp[2 * kq + 1][0], dp[2 * kq + 1][1]);
            da[kq][3] = pack2(dp[2 * kq + 1][2], dp[2 * kq + 1][3]);
        }
{%- endif %}

{%- if p_smem %}
        // 4. P^T and dS^T into shared memory (row = key, 16-byte chunk = 8 queries of this
        // warpgroup's half, swizzled); once both halves are there, dQ, then dV += P^T dO and
        // dK += dS^T Q over this warpgroup's KV_N columns (step 5).
#pragma unroll
        for (int ni = 0; ni < SN; ++ni) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = key_row0 + gq + 8 * hh;
                const unsigned off = sw_off<BLOCK_N>(r, q_col0 / 8 + ni) + 4 * tq;
                *reinterpret_cast<unsigned*>(sP + off) = pa[ni / 2][(ni % 2) * 2 + hh];
                *reinterpret_cast<unsigned*>(sdS + off) = pack2(dp[ni][2 * hh], dp[ni][2 * hh + 1]);
            }
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
{%- else %}
        // 4. dS^T into shared memory (row = key, 16-byte chunk = 8 queries, swizzled) for dQ,
        // before da becomes the A operand of an MMA in flight (PTX: accessing those registers
        // before the wait that covers the MMA is undefined).
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = key_row0 + gq + 8 * hh;
                *reinterpret_cast<unsigned*>(sdS + sw_off<BLOCK_N>(r, 2 * kq) + 4 * tq) = da[kq][hh];
                *reinterpret_cast<unsigned*>(sdS + sw_off<BLOCK_N>(r, 2 * kq + 1) + 4 * tq) = da[kq][2 + hh];
            }
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
{%- endif %}

        // 5. dQ_partial = dS K once both warpgroups' halves of dS^T are in shared memory, then
        // {% if stages < 3 %}dV += P^T dO and {% endif %}dK += dS^T Q, a commit group of their own: the wait below is for dQ
        // only, and their products run under dQ's reductions (step 6).
        float dq[QN][4];
        fence_acc(dq);
        wgmma_fence();
        const GmmaDesc desc_ds_mn = gmma_desc(dqa, BLOCK_N * 128, 1024), desc_k_mn = gmma_desc(dqb, BLOCK_N * 128, 1024);
#pragma unroll
        for (int kk = 0; kk < KN; ++kk)
            wgmma_dq(dq, gmma_at(desc_ds_mn, (unsigned)(kk * 16 * 128)), gmma_at(desc_k_mn, (unsigned)(kk * 16 * 128)),
                     kk > 0 ? 1 : 0);
        wgmma_commit();
{%- if stages < 3 %}
        fence_acc(dv);
{%- endif %}
        fence_acc(dk);
        wgmma_fence();
{%- if p_smem %}
        {
            // A (P^T, dS^T) from shared memory, K-major; B's columns kv_col0 .. in 64-column
            // panels BLOCK_M * 128 bytes apart.
            const unsigned panel = (unsigned)((kv_col0 / 64) * BLOCK_M * 128);
            const GmmaDesc desc_p = gmma_desc(sP_addr, 16, 1024), desc_ds = gmma_desc(sdS_addr, 16, 1024);
#pragma unroll
            for (int kq = 0; kq < KQ; ++kq) {
                const unsigned a_off = (unsigned)((kq / 4) * BLOCK_N * 128 + (kq % 4) * 32);
                const unsigned b_off = panel + (unsigned)(kq * 16 * 128);
                wgmma_kv_ss(dv, gmma_at(desc_p, a_off), gmma_at(desc_o_mn, b_off));
                wgmma_kv_ss(dk, gmma_at(desc_ds, a_off), gmma_at(desc_q_mn, b_off));
            }
        }
{%- else %}
        // A (P^T, dS^T) from registers; queries kq * 16 .. of the step's Q / dO tiles (64-column
        // panels BLOCK_M * 128 bytes apart, 8-row groups 1024 bytes apart).
{%- if stages < 3 %}
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq)
            wgmma_kv(dv, pa[kq], gmma_at(desc_o_mn, (unsigned)(kq * 16 * 128)));
{%- endif %}
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq)
            wgmma_kv(dk, da[kq], gmma_at(desc_q_mn, (unsigned)(kq * 16 * 128)));
{%- endif %}
        wgmma_commit();
        wgmma_wait<1>();
        fence_acc(dq);

        // 6. dQ_partial into dq_accum (rows past sq skipped), 16 bytes per reduction, no lane
        // exchange: dq_accum's columns are permuted within each group of 16 (`dq_permuted` in
        // partials/backward_fused.cu; `_dq_convert` puts them back) so that a thread's pair of
        // columns 2 * tq, 2 * tq + 1 in n8 tiles qn and qn + 1 (one row) are 4 adjacent floats
        // at 4 * tq. A thread holds, per tile, query rows gq and gq + 8 of its warp's 16.
        // (Exchanging halves between lanes instead cost 2 shuffles and 4 selects per
        // reduction: a third of the warps' stall samples at head dim 256, Nsight Compute.)
        {
            const int i0 = m0 + dq_row0 + (warp % 4) * 16 + gq;
            float* row0 = p.dq_accum + ((q_tok0 + (long long)i0 * q_step) * num_heads + h) * HEAD_DIM + dq_col0 + 4 * tq;
            float* row1 = row0 + 8LL * q_step * num_heads * HEAD_DIM;
            auto reduce = [&](int ok0, int ok1) {
#pragma unroll
                for (int qn = 0; qn < QN; qn += 2) {
                    red_add4(row0 + qn * 8, dq[qn][0], dq[qn][1], dq[qn + 1][0], dq[qn + 1][1], ok0);
                    red_add4(row1 + qn * 8, dq[qn][2], dq[qn][3], dq[qn + 1][2], dq[qn + 1][3], ok1);
                }
            };
            // Every row exists (a uniform branch): literal predicates, which the compiler
            // drops (a runtime one ptxas turns into a branch around each reduction).
            if (m0 + BLOCK_M <= sq)
                reduce(1, 1);
            else
                reduce(i0 < sq, i0 + 8 < sq);
        }
        // dV and dK done before the next step's loads overwrite this step's Q / dO buffer (and,
        // schedules 3 and 4, before the next dV reads pa / dv).
        wgmma_wait<0>();
        fence_acc(dv);
        fence_acc(dk);
    }
    cp_async_wait<0>();

    // dK * scale, dV: key rows n0 + key_row0 + gq + 8 * hh (zeros for keys no query sees).
    const float scale = p.softmax_scale;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = n0 + key_row0 + gq + 8 * hh;
        if (j < sk) {
            const long long off =
                ((k_tok0 + (long long)j * k_step) * num_groups + grp) * HEAD_DIM + kv_col0 + 2 * tq;
#pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
                *reinterpret_cast<unsigned*>(p.dk + off + dn * 8) =
                    pack2(dk[dn][2 * hh] * scale, dk[dn][2 * hh + 1] * scale);
                *reinterpret_cast<unsigned*>(p.dv + off + dn * 8) = pack2(dv[dn][2 * hh], dv[dn][2 * hh + 1]);
            }
        }
    }
}

{% set fused_part = "convert" %}
{% set dq_permuted = true %}
{% include "partials/backward_fused.cu" %}
