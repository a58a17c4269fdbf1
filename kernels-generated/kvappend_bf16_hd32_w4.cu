// Kernel `kvappend_bf16_hd32_w4`: append new (already rotated) keys and values into a KV cache, rendered
// from templates/paged_append.cu. dtype bf16, head dim 32.
//
// Request r owns packed rows cu_seqlens_q[r] .. cu_seqlens_q[r + 1]; its new token i goes to
// position p = seqlens_k[r] - new_r + i.
//   Paged (block_table not null): pool row block_table[r, p / block_size] * block_size
//     + p % block_size of a pool [num_blocks, block_size, num_groups, HEAD_DIM].
//   Static (block_table null): cache row p * max_batch + batch_offset + r of a cache
//     [max_seq, max_batch, num_groups, HEAD_DIM] (block_size, max_blocks_per_seq ignored).
// A null cu_seqlens_q means padded rows [s, batch] (token t = position t / batch of request
// t % batch, s = total_tokens / batch). Every offset is 64-bit. The host validates ids and capacity before launching.
//
// Launch: grid (total_tokens), block 128.
//
// Layouts: k, v: elem_t [total_tokens, num_groups, HEAD_DIM] (packed); cu_seqlens_q int32
//   [batch + 1]; seqlens_k int32 [batch]; block_table int32 [batch, max_blocks_per_seq].

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
constexpr int HEAD_DIM = 32;
/// Channels held by each lane: channel `c * WARP_SIZE + lane`, `c < LANE_D`.
constexpr int LANE_D = HEAD_DIM / WARP_SIZE;
static_assert(HEAD_DIM % WARP_SIZE == 0, "head dim must be a multiple of the warp size");

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_WARP, x, o);
    return x;
}

static_assert(LANE_D >= 1, "rows are whole warps of channels");

extern "C" __global__ void __launch_bounds__(128) kvappend_bf16_hd32_w4(
    const elem_t* __restrict__ k,
    const elem_t* __restrict__ v,
    elem_t* __restrict__ k_dst,
    elem_t* __restrict__ v_dst,
    const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ seqlens_k,
    const int* __restrict__ block_table,
    int batch,
    int num_groups,
    int block_size,
    int max_blocks_per_seq,
    int batch_offset,
    int max_batch)
{
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
    const long long p = (long long)seqlens_k[r] - n + i;
    long long dst_row;
    if (block_table != nullptr) {
        const long long blk = block_table[(long long)r * max_blocks_per_seq + p / block_size];
        dst_row = blk * block_size + p % block_size;
    } else {
        dst_row = p * max_batch + batch_offset + r;
    }
    const long long row = (long long)num_groups * HEAD_DIM;
    for (long long e = threadIdx.x; e < row; e += blockDim.x) {
        k_dst[dst_row * row + e] = k[t * row + e];
        v_dst[dst_row * row + e] = v[t * row + e];
    }
}
