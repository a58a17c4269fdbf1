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
