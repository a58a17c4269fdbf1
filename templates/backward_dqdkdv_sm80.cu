// Kernel `{{ key }}`: attention backward in one pass (FlashAttention-2's schedule), rendered
// from templates/backward_dqdkdv_sm80.cu. dtype {{ dtype }}, head dim {{ head_dim }}, mask
// {{ mask }}, window {{ has_window }}, bias {{ has_bias }}.
// Tile: BLOCK_M {{ block_m }} queries per step x BLOCK_N {{ block_n }} keys per block, {{ warps }}
// warps; warp grids (WARPS / the given count along the other side): S and dP {{ wm_s }} along
// the queries, dK and dV {{ wn_kv }} along the keys, dQ {{ wm_q }} along the queries.
//
// Parameters: one `const BwdParams p` (partials/params_bwd.cu), layouts and math as
// templates/backward_sm80.cu (P from the forward's LSE, dS = P o (dP - D), dV = P^T dO,
// dK = scale dS^T Q, dQ = scale dS K). The fast, non-deterministic mode:
//
// `{{ key }}`: grid (ceil(max_seqlen_k / BLOCK_N), num_groups, batch). A block owns one KV tile
//   of one group, keeps K and V in shared memory and loops over every query head of the group
//   (GQA) and every query tile that sees the tile. Per step: S = Q K^T and dP = dO V^T in
//   registers (warp tiles of the query x key grid), P and dS (rounded to {{ dtype }}) into
//   shared memory, then dV += P^T dO and dK += dS^T Q (accumulated in registers over the whole
//   loop, warp tiles of the key x head-dim grid) and dQ_partial = dS K (warp tiles of the
//   query x head-dim grid) added to `dq_accum` (f32, layout of q, zeroed by the preprocess kernel)
//   with f32 atomics: the order of those additions varies from run to run, so dQ (and only
//   dQ) is not bitwise reproducible. dbias = dS is written directly (each element once).
// `{{ key }}_dq_convert`: dq = softmax_scale * dq_accum, rounded to {{ dtype }}; grid-stride over
//   `total_q * num_heads * HEAD_DIM` elements, two per thread.
// Dynamic shared memory: (2 * BLOCK_N + 4 * BLOCK_M) * (HEAD_DIM + 8) * 2 (K, V, two buffers
// of Q and dO) + 2 * BLOCK_M * (BLOCK_N + 8) * 2 (P, dS) + 16 * BLOCK_M (LSE, D) bytes.

{% include "partials/types.cu" %}
{% include "partials/mask.cu" %}
{% include "partials/params_bwd.cu" %}
{% include "partials/cp_async.cu" %}
{% include "partials/mma_sm80.cu" %}
{% include "partials/pack.cu" %}
{% include "partials/backward_common.cu" %}

constexpr int BLOCK_M = {{ block_m }};
constexpr int BLOCK_N = {{ block_n }};
constexpr int WARPS = {{ warps }};
constexpr int THREADS = WARPS * WARP_SIZE;
constexpr int SROW = HEAD_DIM + 8;   // K, V, Q, dO row stride (elements)
constexpr int PROW = BLOCK_N + 8;    // P, dS row stride (elements)
constexpr int KD = HEAD_DIM / 16;    // k16 steps over the head dim
// S / dP warp grid: WM_S x WN_S warps, each TM_S queries x TN_S keys.
constexpr int WM_S = {{ wm_s }};
constexpr int WN_S = WARPS / WM_S;
constexpr int TM_S = BLOCK_M / WM_S;
constexpr int TN_S = BLOCK_N / WN_S;
constexpr int MI = TM_S / 16;
constexpr int NI = TN_S / 8;
// dK / dV warp grid: WN_KV x WD_KV warps, each TK keys x TD head-dim columns.
constexpr int WN_KV = {{ wn_kv }};
constexpr int WD_KV = WARPS / WN_KV;
constexpr int TK = BLOCK_N / WN_KV;
constexpr int TD = HEAD_DIM / WD_KV;
constexpr int KI = TK / 16;
constexpr int DI = TD / 8;
// dQ warp grid: WM_Q x WD_Q warps, each TQ queries x TDQ head-dim columns.
constexpr int WM_Q = {{ wm_q }};
constexpr int WD_Q = WARPS / WM_Q;
constexpr int TQ = BLOCK_M / WM_Q;
constexpr int TDQ = HEAD_DIM / WD_Q;
constexpr int QI = TQ / 16;
constexpr int QDI = TDQ / 8;
static_assert(HEAD_DIM % 16 == 0, "head dim must be a multiple of 16");
static_assert(WM_S * WN_S == WARPS && TM_S % 16 == 0 && TN_S % 16 == 0, "S warp grid");
static_assert(WN_KV * WD_KV == WARPS && TK % 16 == 0 && TD % 16 == 0, "dK/dV warp grid");
static_assert(WM_Q * WD_Q == WARPS && TQ % 16 == 0 && TDQ % 16 == 0, "dQ warp grid");
static_assert(LANE_D >= 1, "types.cu's per-lane split (unused here)");
constexpr int Q_ELEMS = BLOCK_M * SROW;


{% include "partials/backward_fused.cu" %}

extern "C" __global__ void __launch_bounds__(THREADS, 1) {{ key }}(const BwdParams p) {
    extern __shared__ uint4 smem_raw[];
    elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sV = sK + BLOCK_N * SROW;
    elem_t* sQ = sV + BLOCK_N * SROW;      // 2 buffers
    elem_t* sdO = sQ + 2 * Q_ELEMS;        // 2 buffers
    elem_t* sP = sdO + 2 * Q_ELEMS;        // [BLOCK_M][PROW]
    elem_t* sdS = sP + BLOCK_M * PROW;     // [BLOCK_M][PROW]
    float* sL = reinterpret_cast<float*>(sdS + BLOCK_M * PROW);  // 2 x BLOCK_M, the LSE
    float* sD = sL + 2 * BLOCK_M;                                // 2 x BLOCK_M

{% include "partials/bwd_kv_block.cu" %}

    // Step t: query head grp * hpg + t / nm_tiles, query tile mt_begin + t % nm_tiles.
    auto load_step = [&](int t) {
        const int buf = t & 1;
        const int h = grp * hpg + t / nm_tiles;
        const int m0 = (mt_begin + t % nm_tiles) * BLOCK_M;
        const int m_valid = min(BLOCK_M, sq - m0);
        const long long q_base = ((q_tok0 + (long long)m0 * q_step) * num_heads + h) * HEAD_DIM;
        load_rows<BLOCK_M, THREADS, SROW>(sQ + buf * Q_ELEMS, p.q + q_base, q_row_stride, m_valid, tid);
        load_rows<BLOCK_M, THREADS, SROW>(sdO + buf * Q_ELEMS, p.dout + q_base, q_row_stride, m_valid, tid);
        load_lse_d<BLOCK_M, THREADS>(sL + buf * BLOCK_M, sD + buf * BLOCK_M, p.lse, p.dpsum, h, total_q, q_tok0,
                                     q_step, m0, m_valid, tid);
    };

    load_rows<BLOCK_N, THREADS, SROW>(sK, p.k + kv_base, kv_row_stride, n_valid, tid);
    load_rows<BLOCK_N, THREADS, SROW>(sV, p.v + kv_base, kv_row_stride, n_valid, tid);
    if (nsteps > 0) load_step(0);
    cp_async_commit();

    const float sl2 = p.softmax_scale * BWD_LOG2E;
{%- if has_bias %}
    const float scale_nat = p.softmax_scale;
    (void)sl2;
{%- endif %}
    const unsigned sK_addr = smem_addr(sK);
    const unsigned sV_addr = smem_addr(sV);
    const unsigned sQ_addr = smem_addr(sQ);
    const unsigned sdO_addr = smem_addr(sdO);
    const unsigned sP_addr = smem_addr(sP);
    const unsigned sdS_addr = smem_addr(sdS);
    // This warp's tiles in the three grids.
    const int s_r0 = (warp / WN_S) * TM_S;   // S: first query row
    const int s_c0 = (warp % WN_S) * TN_S;   // S: first key
    const int kv_k0 = (warp % WN_KV) * TK;   // dK/dV: first key
    const int kv_d0 = (warp / WN_KV) * TD;   // dK/dV: first head-dim column
    const int q_r0 = (warp % WM_Q) * TQ;     // dQ: first query row
    const int q_d0 = (warp / WM_Q) * TDQ;    // dQ: first head-dim column

    float dk[KI][DI][4], dv[KI][DI][4];
#pragma unroll
    for (int ki = 0; ki < KI; ++ki) {
#pragma unroll
        for (int di = 0; di < DI; ++di) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                dk[ki][di][e] = 0.0f;
                dv[ki][di][e] = 0.0f;
            }
        }
    }

    for (int t = 0; t < nsteps; ++t) {
        // Step t's tiles landed, and every warp is done with step t - 1 (its buffers, P, dS).
        cp_async_wait<0>();
        __syncthreads();
        if (t + 1 < nsteps) load_step(t + 1);
        cp_async_commit();

        const int buf = t & 1;
        const int h = grp * hpg + t / nm_tiles;
        const int m0 = (mt_begin + t % nm_tiles) * BLOCK_M;
        const unsigned q_addr = sQ_addr + (unsigned)(buf * Q_ELEMS * 2);
        const unsigned o_addr = sdO_addr + (unsigned)(buf * Q_ELEMS * 2);
        const float* lrow = sL + buf * BLOCK_M;
        const float* drow = sD + buf * BLOCK_M;

        // 1. S = Q K^T on this warp's TM_S x TN_S tile, then P = exp2(S * scale * log2e - LSE)
        // into shared memory, then dP = dO V^T and
        // dS = P o (dP - D) into shared memory: S and dP are never live together. Element
        // (mi, ni, 2 * hh + e): query row m0 + s_r0 + mi * 16 + gq + 8 * hh, key
        // n0 + s_c0 + ni * 8 + 2 * tq + e.
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
        // dbias: dense f32 [batch, num_heads, seqlen_q, seqlen_k] (zero-filled by the host).
        float* dbbase = p.dbias == nullptr ? nullptr
                                           : p.dbias + ((long long)b * num_heads + h) * p.seqlen_q * p.seqlen_k;
{%- endif %}
        {
            float s[MI][NI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mi][ni][e] = 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                unsigned fa[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
                    ldmatrix_x4(fa[mi], q_addr + (unsigned)(((s_r0 + mi * 16 + lane % 16) * SROW + kk * 16 +
                                                            (lane / 16) * 8) * 2));
#pragma unroll
                for (int nj = 0; nj < NI / 2; ++nj) {
                    unsigned fb[4];
                    ldmatrix_x4(fb, sK_addr + (unsigned)(((s_c0 + nj * 16 + lane % 8 + (lane / 16) * 8) * SROW +
                                                          kk * 16 + ((lane / 8) % 2) * 8) * 2));
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma16816(s[mi][2 * nj], fa[mi], fb[0], fb[1]);
                        mma16816(s[mi][2 * nj + 1], fa[mi], fb[2], fb[3]);
                    }
                }
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int r = s_r0 + mi * 16 + gq + 8 * hh;  // row within the tile
                    const int i = m0 + r;
                    const float l2 = lse_log2(lrow[r]);
                    int lo = 0, hi = 0;
                    if (!full) visible_range(i, sq, sk, window_left, window_right, &lo, &hi);
                    // Rows past the sequence (only in tiles that are not full) see nothing.
                    if (i >= sq) hi = lo;
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) {
                        float pv[2];
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = n0 + s_c0 + ni * 8 + 2 * tq + e;
                            pv[e] = fused_prob(s[mi][ni][2 * hh + e], i, j, lo, hi, full, sq, sk, l2, sl2,
                                               {% if has_bias %}scale_nat{% else %}0.0f{% endif %},
                                               {% if mask_tensor %}mbase{% else %}nullptr{% endif %}, {% if has_bias %}bbase{% else %}nullptr{% endif %}, p);
                        }
                        *reinterpret_cast<unsigned*>(sP + r * PROW + s_c0 + ni * 8 + 2 * tq) = pack2(pv[0], pv[1]);
                    }
                }
            }
        }
        {
            float dp[MI][NI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) dp[mi][ni][e] = 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                unsigned fa[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
                    ldmatrix_x4(fa[mi], o_addr + (unsigned)(((s_r0 + mi * 16 + lane % 16) * SROW + kk * 16 +
                                                            (lane / 16) * 8) * 2));
#pragma unroll
                for (int nj = 0; nj < NI / 2; ++nj) {
                    unsigned fb[4];
                    ldmatrix_x4(fb, sV_addr + (unsigned)(((s_c0 + nj * 16 + lane % 8 + (lane / 16) * 8) * SROW +
                                                          kk * 16 + ((lane / 8) % 2) * 8) * 2));
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma16816(dp[mi][2 * nj], fa[mi], fb[0], fb[1]);
                        mma16816(dp[mi][2 * nj + 1], fa[mi], fb[2], fb[3]);
                    }
                }
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int r = s_r0 + mi * 16 + gq + 8 * hh;
                    const float dd = drow[r];
{%- if has_bias %}
                    const int i = m0 + r;
{%- endif %}
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) {
                        // P as rounded to {{ dtype }} (what dV's product uses, too), read back
                        // from where this thread wrote it.
                        const float2 pr =
                            unpack2(*reinterpret_cast<const unsigned*>(sP + r * PROW + s_c0 + ni * 8 + 2 * tq));
                        float dsv[2];
                        // P == 0 selects 0: a masked key's dP (finite or not) never enters dS.
                        dsv[0] = pr.x > 0.0f ? pr.x * (dp[mi][ni][2 * hh] - dd) : 0.0f;
                        dsv[1] = pr.y > 0.0f ? pr.y * (dp[mi][ni][2 * hh + 1] - dd) : 0.0f;
{%- if has_bias %}
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = n0 + s_c0 + ni * 8 + 2 * tq + e;
                            if (dbbase != nullptr && i < sq && j < sk) dbbase[(long long)i * p.seqlen_k + j] = dsv[e];
                        }
{%- endif %}
                        *reinterpret_cast<unsigned*>(sdS + r * PROW + s_c0 + ni * 8 + 2 * tq) = pack2(dsv[0], dsv[1]);
                    }
                }
            }
        }
        __syncthreads();

        // 3. dV += P^T dO and dK += dS^T Q (contraction over the step's queries): A = P^T and
        // dS^T through ldmatrix.trans of the row-major P, dS; B = dO, Q through ldmatrix.trans.
#pragma unroll
        for (int kq = 0; kq < BLOCK_M / 16; ++kq) {
            unsigned pa[KI][4], da[KI][4];
#pragma unroll
            for (int ki = 0; ki < KI; ++ki) {
                const unsigned off = (unsigned)(((kq * 16 + (lane / 16) * 8 + lane % 8) * PROW + kv_k0 + ki * 16 +
                                                 ((lane / 8) % 2) * 8) * 2);
                ldmatrix_x4_trans(pa[ki], sP_addr + off);
                ldmatrix_x4_trans(da[ki], sdS_addr + off);
            }
#pragma unroll
            for (int dj = 0; dj < DI / 2; ++dj) {
                unsigned ob[4], qb[4];
                const unsigned off = (unsigned)(((kq * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + kv_d0 +
                                                 dj * 16 + (lane / 16) * 8) * 2);
                ldmatrix_x4_trans(ob, o_addr + off);
                ldmatrix_x4_trans(qb, q_addr + off);
#pragma unroll
                for (int ki = 0; ki < KI; ++ki) {
                    mma16816(dv[ki][2 * dj], pa[ki], ob[0], ob[1]);
                    mma16816(dv[ki][2 * dj + 1], pa[ki], ob[2], ob[3]);
                    mma16816(dk[ki][2 * dj], da[ki], qb[0], qb[1]);
                    mma16816(dk[ki][2 * dj + 1], da[ki], qb[2], qb[3]);
                }
            }
        }

        // 4. dQ_partial = dS K (contraction over the tile's keys; A = dS row-major, B = K
        // through ldmatrix.trans), added to dq_accum (rows past sq skipped).
        {
            float acc[QI][QDI][4];
#pragma unroll
            for (int qi = 0; qi < QI; ++qi) {
#pragma unroll
                for (int di = 0; di < QDI; ++di) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[qi][di][e] = 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                unsigned sa[QI][4];
#pragma unroll
                for (int qi = 0; qi < QI; ++qi) {
                    const unsigned a_off =
                        (unsigned)(((q_r0 + qi * 16 + lane % 16) * PROW + kk * 16 + (lane / 16) * 8) * 2);
                    ldmatrix_x4(sa[qi], sdS_addr + a_off);
                }
#pragma unroll
                for (int dj = 0; dj < QDI / 2; ++dj) {
                    unsigned kb[4];
                    const unsigned off = (unsigned)(((kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + q_d0 +
                                                     dj * 16 + (lane / 16) * 8) * 2);
                    ldmatrix_x4_trans(kb, sK_addr + off);
#pragma unroll
                    for (int qi = 0; qi < QI; ++qi) {
                        mma16816(acc[qi][2 * dj], sa[qi], kb[0], kb[1]);
                        mma16816(acc[qi][2 * dj + 1], sa[qi], kb[2], kb[3]);
                    }
                }
            }
#pragma unroll
            for (int qi = 0; qi < QI; ++qi) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int i = m0 + q_r0 + qi * 16 + gq + 8 * hh;
                    if (i < sq) {
                        float* row = p.dq_accum + ((q_tok0 + (long long)i * q_step) * num_heads + h) * HEAD_DIM +
                                     q_d0 + 2 * tq;
#pragma unroll
                        for (int di = 0; di < QDI; ++di) {
#if __CUDA_ARCH__ >= 900
                            asm volatile("red.global.add.v2.f32 [%0], { %1, %2 };" ::"l"(row + di * 8),
                                         "f"(acc[qi][di][2 * hh]), "f"(acc[qi][di][2 * hh + 1])
                                         : "memory");
#else
                            asm volatile("red.global.add.f32 [%0], %1;" ::"l"(row + di * 8), "f"(acc[qi][di][2 * hh])
                                         : "memory");
                            asm volatile("red.global.add.f32 [%0], %1;" ::"l"(row + di * 8 + 1),
                                         "f"(acc[qi][di][2 * hh + 1])
                                         : "memory");
#endif
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    // dK * scale, dV: rows n0 + kv_k0 + ki * 16 + gq + 8 * hh (zeros for keys no query sees).
    const float scale = p.softmax_scale;
#pragma unroll
    for (int ki = 0; ki < KI; ++ki) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int j = n0 + kv_k0 + ki * 16 + gq + 8 * hh;
            if (j < sk) {
                const long long off =
                    ((k_tok0 + (long long)j * k_step) * num_groups + grp) * HEAD_DIM + kv_d0 + 2 * tq;
#pragma unroll
                for (int di = 0; di < DI; ++di) {
                    *reinterpret_cast<unsigned*>(p.dk + off + di * 8) =
                        pack2(dk[ki][di][2 * hh] * scale, dk[ki][di][2 * hh + 1] * scale);
                    *reinterpret_cast<unsigned*>(p.dv + off + di * 8) =
                        pack2(dv[ki][di][2 * hh], dv[ki][di][2 * hh + 1]);
                }
            }
        }
    }
}

{% set fused_part = "convert" %}
{% include "partials/backward_fused.cu" %}
