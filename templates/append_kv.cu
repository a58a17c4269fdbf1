// Kernel `{{ key }}`: append new (already rotated) keys and values into a KV cache, rendered
// from templates/append_kv.cu. dtype {{ dtype }}, head dim {{ head_dim }}.
//
// Request r owns packed rows cu_seqlens_q[r] .. cu_seqlens_q[r + 1]; its new token i goes to
// position pos = seqlens_k[r] - new_r + i.
//   Paged (block_table not null): pool row block_table[r, pos / block_size] * block_size
//     + pos % block_size of a pool [num_blocks, block_size, num_groups, HEAD_DIM].
//   Static (block_table null): cache row pos * max_batch + batch_offset + r of a cache
//     [max_seq, max_batch, num_groups, HEAD_DIM] (block_size, max_blocks_per_seq ignored).
// A null cu_seqlens_q means padded rows [s, batch] (token t = position t / batch of request
// t % batch, s = total_tokens / batch). Every offset is 64-bit. The host validates ids and capacity before launching.
//
// Launch: grid (total_tokens), block 128. Parameters: one `const AppendParams p`
// (partials/params.cu), fields named as below (batch_offset and max_batch
// are cache_batch_offset and cache_max_batch).
//
// Layouts: k, v: elem_t [total_tokens, num_groups, HEAD_DIM] (packed); cu_seqlens_q int32
//   [batch + 1]; seqlens_k int32 [batch]; block_table int32 [batch, max_blocks_per_seq].

{% include "partials/types.cu" %}
{% include "partials/params.cu" %}
static_assert(LANE_D >= 1, "rows are whole warps of channels");

extern "C" __global__ void __launch_bounds__(128) {{ key }}(const AppendParams p)
{
    const elem_t* __restrict__ k = p.k;
    const elem_t* __restrict__ v = p.v;
    elem_t* __restrict__ k_dst = p.k_dst;
    elem_t* __restrict__ v_dst = p.v_dst;
    const int* __restrict__ cu_seqlens_q = p.cu_seqlens_q;
    const int* __restrict__ block_table = p.block_table;
    const int batch = p.batch, block_size = p.block_size;
    const long long t = blockIdx.x;
    int r;
    long long i, n;
    if (cu_seqlens_q != nullptr) {
        // Request of token t: the last r with cu_seqlens_q[r] <= t (binary search).
        int lo = 0, hi = batch;  // invariant: cu[lo] <= t < cu[hi]
        while (hi - lo > 1) {
            const int mid = (lo + hi) / 2;
            if (cu_seqlens_q[mid] <= t) lo = mid; else hi = mid;
        }
        r = lo;
        const long long q0 = cu_seqlens_q[r];
        n = cu_seqlens_q[r + 1] - q0;
        i = t - q0;
    } else {
        // Padded [s, batch] rows: token t is position t / batch of request t % batch.
        r = (int)(t % batch);
        i = t / batch;
        n = gridDim.x / batch;
    }
    const long long pos = (long long)p.seqlens_k[r] - n + i;
    long long dst_row;
    if (block_table != nullptr) {
        const long long blk = block_table[(long long)r * p.max_blocks_per_seq + pos / block_size];
        dst_row = blk * block_size + pos % block_size;
    } else {
        dst_row = pos * p.cache_max_batch + p.cache_batch_offset + r;
    }
    const long long row = (long long)p.num_groups * HEAD_DIM;
    for (long long e = threadIdx.x; e < row; e += blockDim.x) {
        k_dst[dst_row * row + e] = k[t * row + e];
        v_dst[dst_row * row + e] = v[t * row + e];
    }
}
