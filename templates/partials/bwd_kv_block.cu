// ---------------------------------------------------------------------------------------
// The KV-block setup of the dK/dV backward kernels (backward_sm80.cu's dkdv part,
// backward_dqdkdv_sm80.cu), inside the kernel body: thread ids, the block's KV group and
// sequence, its keys [n0, n1) (returns when past the sequence), the query tiles that can
// see them (partials/backward_common.cu) and the steps over (query head, tile), then the
// Q and K/V row strides and the block's K/V base. Needs BLOCK_M, BLOCK_N and `p`.
// ---------------------------------------------------------------------------------------
    const int tid = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int warp = tid / WARP_SIZE;
    const int gq = lane / 4;
    const int tq = lane % 4;
    const int grp = blockIdx.y;
    const int b = blockIdx.z;
    const int num_heads = p.num_heads;
    const int num_groups = p.num_groups;
    const int hpg = num_heads / num_groups;
    const int window_left = p.window_left;
    const int window_right = p.window_right;

    const BwdSeq seq = bwd_seq(p, b);
    const int sq = seq.sq, sk = seq.sk;
    const long long q_tok0 = seq.q_tok0, k_tok0 = seq.k_tok0, q_step = seq.q_step, k_step = seq.k_step;
    const long long total_q = p.total_q;
    const int n0 = blockIdx.x * BLOCK_N;
    if (n0 >= sk) return;
    const int n_valid = min(BLOCK_N, sk - n0);
    const int n1 = n0 + n_valid;

    // Query rows that can see a key of [n0, n1).
    int i_begin, i_end;
    visible_queries(n0, n1, sq, sk, window_left, window_right, &i_begin, &i_end);
    const int mt_begin = i_begin / BLOCK_M;
    const int nm_tiles = i_end > i_begin ? (i_end + BLOCK_M - 1) / BLOCK_M - mt_begin : 0;
    const int nsteps = nm_tiles * hpg;

    const long long q_row_stride = q_step * num_heads * HEAD_DIM;
    const long long kv_row_stride = k_step * num_groups * HEAD_DIM;
    const long long kv_base = ((k_tok0 + (long long)n0 * k_step) * num_groups + grp) * HEAD_DIM;
