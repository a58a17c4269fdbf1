// Kernel `{{ key }}`: attention backward, FlashAttention-2 style, rendered from
// templates/backward_sm80.cu. Part `{{ bwd_part }}`, dtype {{ dtype }}, head dim {{ head_dim }},
// mask {{ mask }}, window {{ has_window }}.
// Tile: BLOCK_M {{ block_m }} queries x BLOCK_N {{ block_n }} keys, {{ warps }} warps.
//
// Parameters: one `const BwdParams p` (partials/params_bwd.cu). Layouts as the forward
// (templates/prefill_sm80.cu): padded (cu_seqlens_q == nullptr) q, out, dout, dq
// [seqlen_q, batch, num_heads, HEAD_DIM], k, v, dk, dv [seqlen_k, batch, num_groups, HEAD_DIM];
// packed q... [total_q, num_heads, HEAD_DIM], k... [total_k, num_groups, HEAD_DIM] with
// cu_seqlens_q / cu_seqlens_k int32 [batch + 1]. lse (the forward's, natural log) and dpsum
// (D = rowsum(dout * out), from the preprocess kernel) f32 [num_heads, total_q], row
// i * batch + b (padded) or the token index (packed). GQA by indexing: head h reads group
// h / (num_heads / num_groups).
//
// Math (per head, logits s = q.k, softmax_scale folded into base-2 exponents):
//   P = exp2(s * scale * log2e - lse * log2e)   (the forward's LSE, never recomputed; sinks,
//       when the forward had them, are inside the LSE and need nothing here)
//   dV = P^T dO, dP = dO V^T, dS = P o (dP - D), dK = scale * dS^T Q, dQ = scale * dS K.
// Mask tensor {{ mask_tensor }} (padding, padding_causal, arbitrary): `mask` uint8, nonzero =
// masked out, element (b, h, i, j) at b * mask_stride_b + h * mask_stride_h + i * mask_stride_q
// + j * mask_stride_k (stride 0 broadcasts; i, j positions within the sequence, also packed),
// applied per element on every tile, as the forward does.
// Additive bias {{ has_bias }}: `bias` f32 post-scale logit term at the same kind of strides,
// entering through biased_logit_log2 as in the forward; the dQ kernel also writes
// dbias = dS (when dbias is not null) into a dense f32 [batch, num_heads, seqlen_q, seqlen_k] (padded and packed:
// positions within the sequence; the host zero-fills it first: masked positions and tiles
// no row sees stay 0). Broadcast bias dims are summed by the caller.
// Masked positions and query rows whose LSE is -inf (rows that see no key) get P = 0 (the
// exponent is -inf), so they contribute exactly zero; rows / keys past the sequence are
// zero-filled in shared memory and carry LSE +inf, D 0.
//
// {{ bwd_part }} == "dkdv": grid (ceil(max_seqlen_k / BLOCK_N), num_groups, batch), block
//   WARPS * 32, each warp owns 16 keys of the block's KV tile (with DSPLIT = 2, two warps
//   share 16 keys and split the head dim of dK, dV between them) and accumulates their dK, dV
//   in registers over every query head of the group (GQA) and every query tile that sees
//   the KV tile (S^T = K Q^T, so the warp's fragments are its keys' rows and no warp needs
//   another's P or dS). Dynamic shared memory (2 * BLOCK_N + 4 * BLOCK_M) * (HEAD_DIM + 8) * 2
//   + 16 * BLOCK_M bytes: K, V, and two buffers of the Q, dO tiles and their LSE, D.
// {{ bwd_part }} == "dq": grid (ceil(max_seqlen_q / BLOCK_M), num_heads, batch), each warp
//   owns 16 query rows; dynamic shared memory (2 * BLOCK_M + 4 * BLOCK_N) * (HEAD_DIM + 8) * 2
//   bytes: Q, dO and two buffers of the K, V tiles.
// No atomics and a fixed loop order in both: the gradients are bitwise reproducible.
// `__launch_bounds__(THREADS, 1)`: one block per SM is enough for ptxas to use all 255
// registers; without the 1 it capped some variants at 168 and spilled.

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
constexpr int SROW = HEAD_DIM + 8;  // shared-memory row stride (elements), 16 B pad
constexpr int KD = HEAD_DIM / 16;   // k16 steps over the head dim
constexpr int DN = HEAD_DIM / 8;    // n8 tiles over the head dim
static_assert(HEAD_DIM % 16 == 0 && DN % 2 == 0, "head dim must be a multiple of 16");
static_assert(BLOCK_M % 16 == 0 && BLOCK_N % 16 == 0, "tiles are multiples of 16");
static_assert(LANE_D >= 1, "types.cu's per-lane split (unused here)");

{%- if bwd_part == "dkdv" %}
constexpr int NM = BLOCK_M / 8;      // n8 tiles of S^T (query columns)
constexpr int Q_ELEMS = BLOCK_M * SROW;
// DSPLIT warps share each 16 keys: each computes their whole S^T and dP^T (the contraction
// runs over the head dim) but accumulates dK, dV for 1 / DSPLIT of the head dim (large head
// dims: the accumulators would not fit in registers otherwise).
constexpr int DSPLIT = WARPS * 16 / BLOCK_N;
constexpr int KEY_WARPS = WARPS / DSPLIT;  // warps along the keys
constexpr int DNW = DN / DSPLIT;           // n8 tiles of dK / dV per warp
static_assert(DSPLIT * BLOCK_N == 16 * WARPS && (DSPLIT == 1 || DSPLIT == 2),
              "dkdv: 16 keys per warp, or per pair of warps");
static_assert(DNW * DSPLIT == DN && DNW % 2 == 0, "dkdv: the head dim splits in 16-column halves");

extern "C" __global__ void __launch_bounds__(THREADS, 1) {{ key }}(const BwdParams p) {
    extern __shared__ uint4 smem_raw[];
    elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sV = sK + BLOCK_N * SROW;
    elem_t* sQ = sV + BLOCK_N * SROW;      // 2 buffers
    elem_t* sdO = sQ + 2 * Q_ELEMS;        // 2 buffers
    float* sL = reinterpret_cast<float*>(sdO + 2 * Q_ELEMS);  // 2 x BLOCK_M, log2 units
    float* sD = sL + 2 * BLOCK_M;                             // 2 x BLOCK_M

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
        for (int r = tid; r < BLOCK_M; r += THREADS) {
            float l2 = pos_inf(), d = 0.0f;
            if (r < m_valid) {
                const long long row = (long long)h * total_q + q_tok0 + (long long)(m0 + r) * q_step;
                l2 = lse_log2(p.lse[row]);
                d = p.dpsum[row];
            }
            sL[buf * BLOCK_M + r] = l2;
            sD[buf * BLOCK_M + r] = d;
        }
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
    const int key_row0 = (warp % KEY_WARPS) * 16;  // this warp's keys within the tile
    const int dn0 = (warp / KEY_WARPS) * DNW;      // its first n8 tile of dK / dV columns

    float dk[DNW][4], dv[DNW][4];
#pragma unroll
    for (int dn = 0; dn < DNW; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dk[dn][e] = 0.0f;
            dv[dn][e] = 0.0f;
        }
    }

    for (int t = 0; t < nsteps; ++t) {
        // Step t's tiles landed, and every warp is done with step t - 1's buffer.
        cp_async_wait<0>();
        __syncthreads();
        if (t + 1 < nsteps) load_step(t + 1);
        cp_async_commit();

        const int buf = t & 1;
        const int m0 = (mt_begin + t % nm_tiles) * BLOCK_M;
{%- if mask_tensor or has_bias %}
        const int h = grp * hpg + t / nm_tiles;
{%- endif %}
{%- if mask_tensor %}
        const unsigned char* mbase =
            p.mask + (long long)b * p.mask_stride_b + (long long)h * p.mask_stride_h;
{%- endif %}
{%- if has_bias %}
        const float* bbase = p.bias + (long long)b * p.bias_stride_b + (long long)h * p.bias_stride_h;
{%- endif %}
        const unsigned q_addr = sQ_addr + (unsigned)(buf * Q_ELEMS * 2);
        const unsigned o_addr = sdO_addr + (unsigned)(buf * Q_ELEMS * 2);
        const float* lrow = sL + buf * BLOCK_M;
        const float* drow = sD + buf * BLOCK_M;

        // S^T = K Q^T (this warp's 16 keys x BLOCK_M queries) and dP^T = V dO^T.
        float s[NM][4], dp[NM][4];
#pragma unroll
        for (int ni = 0; ni < NM; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[ni][e] = 0.0f;
                dp[ni][e] = 0.0f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            unsigned ka[4], va[4];
            const unsigned a_off = (unsigned)(((key_row0 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8) * 2);
            ldmatrix_x4(ka, sK_addr + a_off);
            ldmatrix_x4(va, sV_addr + a_off);
#pragma unroll
            for (int nj = 0; nj < NM / 2; ++nj) {
                unsigned qb[4], ob[4];
                const unsigned b_off =
                    (unsigned)(((nj * 16 + lane % 8 + (lane / 16) * 8) * SROW + kk * 16 + ((lane / 8) % 2) * 8) * 2);
                ldmatrix_x4(qb, q_addr + b_off);
                ldmatrix_x4(ob, o_addr + b_off);
                mma16816(s[2 * nj], ka, qb[0], qb[1]);
                mma16816(s[2 * nj + 1], ka, qb[2], qb[3]);
                mma16816(dp[2 * nj], va, ob[0], ob[1]);
                mma16816(dp[2 * nj + 1], va, ob[2], ob[3]);
            }
        }

        // P^T and dS^T = P^T o (dP^T - D). Fragment element (ni, 2 * hh + e): key
        // n0 + key_row0 + gq + 8 * hh, query m0 + ni * 8 + 2 * tq + e.
        int lo_last, hi_last, lo_first, hi_first;
        visible_range(min(m0 + BLOCK_M, sq) - 1, sq, sk, window_left, window_right, &lo_last, &hi_last);
        visible_range(m0, sq, sk, window_left, window_right, &lo_first, &hi_first);
        const bool full = m0 + BLOCK_M <= sq && n0 + BLOCK_N <= sk && lo_last <= n0 && hi_first >= n0 + BLOCK_N;
#pragma unroll
        for (int ni = 0; ni < NM; ++ni) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = ni * 8 + 2 * tq + e;
                const float l2 = lrow[c];
                const float dd = drow[c];
                int lo = 0, hi = 0;
                if (!full) visible_range(m0 + c, sq, sk, window_left, window_right, &lo, &hi);
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    float x = s[ni][2 * hh + e];
                    if (!full) {
                        const int j = n0 + key_row0 + gq + 8 * hh;
                        if (j < lo || j >= hi) x = neg_inf();
                    }
{%- if mask_tensor %}
                    // The mask tensor, per element on every tile (rows past sq and keys past
                    // sk are never read: their P is already 0).
                    {
                        const int j = n0 + key_row0 + gq + 8 * hh;
                        if (m0 + c < sq && j < sk &&
                            mbase[(long long)(m0 + c) * p.mask_stride_q + (long long)j * p.mask_stride_k] != 0)
                            x = neg_inf();
                    }
{%- endif %}
{%- if has_bias %}
                    // The logit with the bias, in log2 units (biased_logit_log2: saturated; a
                    // -inf bias masks); masked stays -inf, rows past sq / keys past sk unread.
                    {
                        const int j = n0 + key_row0 + gq + 8 * hh;
                        if (x != neg_inf() && m0 + c < sq && j < sk)
                            x = biased_logit_log2(
                                x * scale_nat,
                                bbase[(long long)(m0 + c) * p.bias_stride_q + (long long)j * p.bias_stride_k]);
                        else
                            x = neg_inf();
                    }
                    const float pr = fast_exp2(x - l2);
{%- else %}
                    const float pr = fast_exp2(fmaf(x, sl2, -l2));
{%- endif %}
                    s[ni][2 * hh + e] = pr;
                    // P == 0 selects 0: a masked key's dP (finite or not) never enters dS.
                    dp[ni][2 * hh + e] = pr > 0.0f ? pr * (dp[ni][2 * hh + e] - dd) : 0.0f;
                }
            }
        }

        // dV += P^T dO and dK += dS^T Q (k = the tile's queries; dO, Q through ldmatrix.trans).
#pragma unroll
        for (int kq = 0; kq < BLOCK_M / 16; ++kq) {
            unsigned pa[4], da[4];
            pa[0] = pack2(s[2 * kq][0], s[2 * kq][1]);
            pa[1] = pack2(s[2 * kq][2], s[2 * kq][3]);
            pa[2] = pack2(s[2 * kq + 1][0], s[2 * kq + 1][1]);
            pa[3] = pack2(s[2 * kq + 1][2], s[2 * kq + 1][3]);
            da[0] = pack2(dp[2 * kq][0], dp[2 * kq][1]);
            da[1] = pack2(dp[2 * kq][2], dp[2 * kq][3]);
            da[2] = pack2(dp[2 * kq + 1][0], dp[2 * kq + 1][1]);
            da[3] = pack2(dp[2 * kq + 1][2], dp[2 * kq + 1][3]);
#pragma unroll
            for (int dj = 0; dj < DNW / 2; ++dj) {
                unsigned ob[4], qb[4];
                const unsigned off = (unsigned)(((kq * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW +
                                                 dn0 * 8 + dj * 16 + (lane / 16) * 8) * 2);
                ldmatrix_x4_trans(ob, o_addr + off);
                ldmatrix_x4_trans(qb, q_addr + off);
                mma16816(dv[2 * dj], pa, ob[0], ob[1]);
                mma16816(dv[2 * dj + 1], pa, ob[2], ob[3]);
                mma16816(dk[2 * dj], da, qb[0], qb[1]);
                mma16816(dk[2 * dj + 1], da, qb[2], qb[3]);
            }
        }
    }
    cp_async_wait<0>();

    // dK * scale, dV: rows n0 + key_row0 + gq + 8 * hh (zeros for keys no query sees).
    const float scale = p.softmax_scale;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int j = n0 + key_row0 + gq + 8 * hh;
        if (j < sk) {
            const long long off =
                ((k_tok0 + (long long)j * k_step) * num_groups + grp) * HEAD_DIM + dn0 * 8 + 2 * tq;
#pragma unroll
            for (int dn = 0; dn < DNW; ++dn) {
                *reinterpret_cast<unsigned*>(p.dk + off + dn * 8) =
                    pack2(dk[dn][2 * hh] * scale, dk[dn][2 * hh + 1] * scale);
                *reinterpret_cast<unsigned*>(p.dv + off + dn * 8) = pack2(dv[dn][2 * hh], dv[dn][2 * hh + 1]);
            }
        }
    }
}
{%- else %}
constexpr int NB = BLOCK_N / 8;      // n8 tiles of S (key columns)
constexpr int KV_ELEMS = BLOCK_N * SROW;
static_assert(BLOCK_M == 16 * WARPS, "dq: each warp owns 16 query rows");

extern "C" __global__ void __launch_bounds__(THREADS, 1) {{ key }}(const BwdParams p) {
    extern __shared__ uint4 smem_raw[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sdO = sQ + BLOCK_M * SROW;
    elem_t* sK = sdO + BLOCK_M * SROW;     // 2 buffers
    elem_t* sV = sK + 2 * KV_ELEMS;        // 2 buffers

    const int tid = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int gq = lane / 4;
    const int tq = lane % 4;
    const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int num_heads = p.num_heads;
    const int num_groups = p.num_groups;
    const int grp = h / (num_heads / num_groups);
    const int window_left = p.window_left;
    const int window_right = p.window_right;

    const BwdSeq seq = bwd_seq(p, b);
    const int sq = seq.sq, sk = seq.sk;
    const long long q_tok0 = seq.q_tok0, k_tok0 = seq.k_tok0, q_step = seq.q_step, k_step = seq.k_step;
    const long long total_q = p.total_q;
    const int m0 = m_block * BLOCK_M;
    if (m0 >= sq) return;
    const int m_valid = min(BLOCK_M, sq - m0);

{% include "partials/q_block_tiles.cu" %}

    auto load_kv = [&](int t) {
        const int buf = t & 1;
        const int n0 = (tile_lo + t) * BLOCK_N;
        const long long base = kv_base + (long long)n0 * kv_row_stride;
        load_rows<BLOCK_N, THREADS, SROW>(sK + buf * KV_ELEMS, p.k + base, kv_row_stride, sk - n0, tid);
        load_rows<BLOCK_N, THREADS, SROW>(sV + buf * KV_ELEMS, p.v + base, kv_row_stride, sk - n0, tid);
    };
    load_rows<BLOCK_M, THREADS, SROW>(sQ, p.q + q_base, q_row_stride, m_valid, tid);
    load_rows<BLOCK_M, THREADS, SROW>(sdO, p.dout + q_base, q_row_stride, m_valid, tid);
    if (ntiles > 0) load_kv(0);
    cp_async_commit();

    // This thread's rows r = warp * 16 + gq + 8 * hh: LSE (log2 units) and D.
    float l2[2], dd[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = warp * 16 + gq + 8 * hh;
        l2[hh] = pos_inf();
        dd[hh] = 0.0f;
        if (r < m_valid) {
            const long long row = (long long)h * total_q + q_tok0 + (long long)(m0 + r) * q_step;
            l2[hh] = lse_log2(p.lse[row]);
            dd[hh] = p.dpsum[row];
        }
    }

    const float sl2 = p.softmax_scale * BWD_LOG2E;
{%- if has_bias %}
    const float scale_nat = p.softmax_scale;
    (void)sl2;
{%- endif %}
    const unsigned sQ_addr = smem_addr(sQ);
    const unsigned sdO_addr = smem_addr(sdO);
    const unsigned sK_addr = smem_addr(sK);
    const unsigned sV_addr = smem_addr(sV);

    float dq[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[dn][e] = 0.0f;
    }

    for (int t = 0; t < ntiles; ++t) {
        cp_async_wait<0>();
        __syncthreads();
        if (t + 1 < ntiles) load_kv(t + 1);
        cp_async_commit();

        const int buf = t & 1;
        const int n0 = (tile_lo + t) * BLOCK_N;
        const unsigned k_addr = sK_addr + (unsigned)(buf * KV_ELEMS * 2);
        const unsigned v_addr = sV_addr + (unsigned)(buf * KV_ELEMS * 2);

        // S = Q K^T and dP = dO V^T for this warp's 16 rows.
        float s[NB][4], dp[NB][4];
#pragma unroll
        for (int ni = 0; ni < NB; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[ni][e] = 0.0f;
                dp[ni][e] = 0.0f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            unsigned qa[4], oa[4];
            const unsigned a_off = (unsigned)(((warp * 16 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8) * 2);
            ldmatrix_x4(qa, sQ_addr + a_off);
            ldmatrix_x4(oa, sdO_addr + a_off);
#pragma unroll
            for (int nj = 0; nj < NB / 2; ++nj) {
                unsigned kb[4], vb[4];
                const unsigned b_off =
                    (unsigned)(((nj * 16 + lane % 8 + (lane / 16) * 8) * SROW + kk * 16 + ((lane / 8) % 2) * 8) * 2);
                ldmatrix_x4(kb, k_addr + b_off);
                ldmatrix_x4(vb, v_addr + b_off);
                mma16816(s[2 * nj], qa, kb[0], kb[1]);
                mma16816(s[2 * nj + 1], qa, kb[2], kb[3]);
                mma16816(dp[2 * nj], oa, vb[0], vb[1]);
                mma16816(dp[2 * nj + 1], oa, vb[2], vb[3]);
            }
        }

        // dS = P o (dP - D), P = exp2(s * scale * log2e - lse2); element (ni, 2 * hh + e):
        // row m0 + warp * 16 + gq + 8 * hh, key n0 + ni * 8 + 2 * tq + e.
        const bool full = n0 >= lo_last && n0 + BLOCK_N <= hi_first;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            int lo = 0, hi = 0;
            if (!full) visible_range(m0 + warp * 16 + gq + 8 * hh, sq, sk, window_left, window_right, &lo, &hi);
{%- if mask_tensor or has_bias %}
            const int mi_row = m0 + warp * 16 + gq + 8 * hh;
{%- endif %}
{%- if mask_tensor %}
            const unsigned char* mrow = p.mask + (long long)b * p.mask_stride_b + (long long)h * p.mask_stride_h +
                                        (long long)mi_row * p.mask_stride_q;
{%- endif %}
{%- if has_bias %}
            const float* brow = p.bias + (long long)b * p.bias_stride_b + (long long)h * p.bias_stride_h +
                                (long long)mi_row * p.bias_stride_q;
            // dbias: dense f32 [batch, num_heads, seqlen_q, seqlen_k] (zero-filled by the host).
            float* dbrow = p.dbias + (((long long)b * num_heads + h) * p.seqlen_q + mi_row) * p.seqlen_k;
{%- endif %}
#pragma unroll
            for (int ni = 0; ni < NB; ++ni) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = s[ni][2 * hh + e];
                    if (!full) {
                        const int j = n0 + ni * 8 + 2 * tq + e;
                        if (j < lo || j >= hi) x = neg_inf();
                    }
{%- if mask_tensor %}
                    {
                        // The mask tensor on every tile (rows past sq, keys past sk unread).
                        const int j = n0 + ni * 8 + 2 * tq + e;
                        if (mi_row < sq && j < sk && mrow[(long long)j * p.mask_stride_k] != 0) x = neg_inf();
                    }
{%- endif %}
{%- if has_bias %}
                    const int jb = n0 + ni * 8 + 2 * tq + e;
                    if (x != neg_inf() && mi_row < sq && jb < sk)
                        x = biased_logit_log2(x * scale_nat, brow[(long long)jb * p.bias_stride_k]);
                    else
                        x = neg_inf();
                    const float pr = fast_exp2(x - l2[hh]);
{%- else %}
                    const float pr = fast_exp2(fmaf(x, sl2, -l2[hh]));
{%- endif %}
                    // P == 0 selects 0: a masked key's dP (finite or not) never enters dS.
                    dp[ni][2 * hh + e] = pr > 0.0f ? pr * (dp[ni][2 * hh + e] - dd[hh]) : 0.0f;
{%- if has_bias %}
                    // dbias = dS (natural units), every visited position of the sequence.
                    if (p.dbias != nullptr && mi_row < sq && jb < sk) dbrow[jb] = dp[ni][2 * hh + e];
{%- endif %}
                }
            }
        }

        // dQ += dS K (k = the tile's keys; K through ldmatrix.trans).
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned da[4];
            da[0] = pack2(dp[2 * kk][0], dp[2 * kk][1]);
            da[1] = pack2(dp[2 * kk][2], dp[2 * kk][3]);
            da[2] = pack2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            da[3] = pack2(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
            for (int dj = 0; dj < DN / 2; ++dj) {
                unsigned kb[4];
                const unsigned off =
                    (unsigned)(((kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + dj * 16 + (lane / 16) * 8) * 2);
                ldmatrix_x4_trans(kb, k_addr + off);
                mma16816(dq[2 * dj], da, kb[0], kb[1]);
                mma16816(dq[2 * dj + 1], da, kb[2], kb[3]);
            }
        }
    }
    cp_async_wait<0>();

    const float scale = p.softmax_scale;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = warp * 16 + gq + 8 * hh;
        if (r < m_valid) {
            const long long off =
                ((q_tok0 + (long long)(m0 + r) * q_step) * num_heads + h) * HEAD_DIM + 2 * tq;
#pragma unroll
            for (int dn = 0; dn < DN; ++dn)
                *reinterpret_cast<unsigned*>(p.dq + off + dn * 8) =
                    pack2(dq[dn][2 * hh] * scale, dq[dn][2 * hh + 1] * scale);
        }
    }
}
{%- endif %}
