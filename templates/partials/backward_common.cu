// ---------------------------------------------------------------------------------------
// What the backward kernels (templates/backward_sm80.cu, backward_dqdkdv_sm80.cu) share: the
// cp.async row loader, the LSE in log2 units, one sequence's rows, and the query rows that
// can see a KV tile. Needs partials/types.cu, mask.cu (visible_range), params_bwd.cu and
// cp_async.cu first.
// ---------------------------------------------------------------------------------------

/// Async copy of `ROWS` rows (HEAD_DIM elements each, global row stride `stride` elements)
/// into shared memory rows of SROW elements; rows at or past `nvalid` are zero-filled.
template <int ROWS, int NTHREADS, int ROW_ELEMS>
__device__ __forceinline__ void load_rows(elem_t* dst, const elem_t* __restrict__ src, long long stride,
                                          int nvalid, int tid) {
    constexpr int CH = HEAD_DIM / 8;
    const unsigned base = smem_addr(dst);
#pragma unroll
    for (int c = tid; c < ROWS * CH; c += NTHREADS) {
        const int r = c / CH;
        const int ch = c % CH;
        const bool ok = r < nvalid;
        const elem_t* g = ok ? src + (long long)r * stride + ch * 8 : src;
        cp_async16(base + (unsigned)((r * ROW_ELEMS + ch * 8) * 2), g, ok);
    }
}

constexpr float BWD_LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

/// The forward's natural-log LSE in log2 units; -inf (a row that sees no key) becomes +inf,
/// so every exponent of that row is -inf and its P is exactly 0.
__device__ __forceinline__ float lse_log2(float lse) {
    return lse == neg_inf() ? pos_inf() : lse * BWD_LOG2E;
}

/// Sequence `b`'s lengths and rows: query row i is token `q_tok0 + i * q_step` (padded
/// `[s, b]` rows: tok0 = b, step = batch; packed: tok0 = cu_seqlens[b], step = 1), key row j
/// token `k_tok0 + j * k_step`.
struct BwdSeq {
    int sq, sk;
    long long q_tok0, k_tok0, q_step, k_step;
};

__device__ __forceinline__ BwdSeq bwd_seq(const BwdParams& p, int b) {
    BwdSeq s;
    if (p.cu_seqlens_q != nullptr) {
        const int q0 = p.cu_seqlens_q[b];
        const int k0 = p.cu_seqlens_k[b];
        s.sq = p.cu_seqlens_q[b + 1] - q0;
        s.sk = p.cu_seqlens_k[b + 1] - k0;
        s.q_tok0 = q0;
        s.k_tok0 = k0;
        s.q_step = 1;
        s.k_step = 1;
    } else {
        s.sq = p.seqlen_q;
        s.sk = p.seqlen_k;
        s.q_tok0 = b;
        s.k_tok0 = b;
        s.q_step = p.batch;
        s.k_step = p.batch;
    }
    return s;
}

/// The query rows [*i_begin, *i_end) that can see a key of [n0, n1): visible_range's lo(i)
/// and hi(i) are non-decreasing in i, so they run from the first row with hi(i) > n0 to the
/// first with lo(i) >= n1 (rows inside that see nothing have LSE -inf or are masked per
/// element). Two binary searches.
__device__ __forceinline__ void visible_queries(int n0, int n1, int sq, int sk, int window_left,
                                                int window_right, int* i_begin, int* i_end) {
    int a = 0, z = sq;
    while (a < z) {
        const int mid = (a + z) / 2;
        int lo, hi;
        visible_range(mid, sq, sk, window_left, window_right, &lo, &hi);
        if (hi > n0) z = mid; else a = mid + 1;
    }
    *i_begin = a;
    z = sq;
    while (a < z) {
        const int mid = (a + z) / 2;
        int lo, hi;
        visible_range(mid, sq, sk, window_left, window_right, &lo, &hi);
        if (lo >= n1) z = mid; else a = mid + 1;
    }
    *i_end = a;
}
