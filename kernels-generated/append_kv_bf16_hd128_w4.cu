// Kernel `append_kv_bf16_hd128_w4`: append new (already rotated) keys and values into a KV cache, rendered
// from templates/append_kv.cu. dtype bf16, head dim 128.
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
constexpr int HEAD_DIM = 128;
/// Channels held by each lane: channel `c * WARP_SIZE + lane`, `c < LANE_D`. A head dim that
/// is not a multiple of the warp size (80) pads the last chunk: its lanes past HEAD_DIM hold
/// channels that do not exist, which load_ch reads as zero and store_ch never writes (so sums
/// over the lanes and dot products stay exact). At a multiple of the warp size ch_ok is the
/// constant true and the checks compile away.
constexpr int LANE_D = (HEAD_DIM + WARP_SIZE - 1) / WARP_SIZE;
static_assert(HEAD_DIM % 16 == 0, "head dim must be a multiple of 16");
static_assert((LANE_D - 1) * WARP_SIZE < HEAD_DIM && LANE_D * WARP_SIZE >= HEAD_DIM, "LANE_D chunks cover the head dim");

/// Whether the lane's channel `c * WARP_SIZE + lane` exists.
__device__ __forceinline__ bool ch_ok(int c, int lane) {
    return HEAD_DIM % WARP_SIZE == 0 || c * WARP_SIZE + lane < HEAD_DIM;
}
/// The lane's channel `c` of a row (zero past HEAD_DIM, never read there).
__device__ __forceinline__ float load_ch(const elem_t* __restrict__ row, int c, int lane) {
    return ch_ok(c, lane) ? load_elem(row + c * WARP_SIZE + lane) : 0.0f;
}
/// Store the lane's channel `c` of a row (nothing past HEAD_DIM).
__device__ __forceinline__ void store_ch(elem_t* row, int c, int lane, float f) {
    if (ch_ok(c, lane)) store_elem(row + c * WARP_SIZE + lane, f);
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_WARP, x, o);
    return x;
}

// ---------------------------------------------------------------------------------------
// Kernel parameter structs, one per kernel family: the host fills one typed struct per
// launch and queues it as the kernel's whole parameter buffer. Kernels take it by value
// (`const FwdParams p`; never take its address, which would copy it to local memory), except
// `prefill_sm80`, which declares the same fields positionally in the same order (the struct
// parameter costs its hot variants spills) and so has the same parameter buffer. The host's
// `#[repr(C)]` twins live in attention-runtime/src/cuda/params.rs with the same fields in the
// same order; attention-runtime/tests/nvrtc_params_layout.rs compiles static_asserts of
// every field's offset and size (taken from the Rust side) against these declarations, and
// tests/nvrtc_catalog.rs checks every compiled kernel's parameter table, with NVRTC alone.
// Pointers are 8 bytes (null = absent), int and float 4, long long 8.
// ---------------------------------------------------------------------------------------

/// Attention over q, k, v: the prefill family (`prefill_rows`, `prefill_sm80` with its
/// static-cache and paged modes) and the one-warp-per-row cache kernels (`decode_rows`,
/// `decode_rows_paged`). Each kernel documents which fields it reads; the others may be
/// null / 0.
struct FwdParams {
    const elem_t* q;               // queries (layout per kernel)
    const elem_t* k;               // keys: packed/padded k, a static cache layer or a pool
    const elem_t* v;               // values, as k
    elem_t* out;                   // output, layout of q
    float* lse;                    // f32 [num_heads, rows], natural log
    const int* cu_seqlens_q;       // int32 [batch + 1] (packed / paged) or null (padded)
    const int* cu_seqlens_k;       // int32 [batch + 1] (packed) or null
    int batch;                     // sequences (requests)
    int num_heads;                 // query heads
    int num_groups;                // K/V groups (divides num_heads)
    int seqlen_q;                  // padded query length; packed: the longest
    int seqlen_k;                  // padded key length; packed: the longest
    float softmax_scale;           // logit scale
    int window_left;               // sliding window, -1 = unbounded
    int window_right;
    const unsigned char* mask;     // uint8 [b, h, i, j] at the strides below, nonzero = masked
    long long mask_stride_b;
    long long mask_stride_h;
    long long mask_stride_q;
    long long mask_stride_k;
    const float* bias;             // f32 additive post-scale bias at the strides below
    long long bias_stride_b;
    long long bias_stride_h;
    long long bias_stride_q;
    long long bias_stride_k;
    const float* sinks;            // f32 [num_heads] learnable sink logits
    const elem_t* gate;            // output gate, layout of q
    float* max_logit;              // f32 [num_heads] per-head max logit record, or null
    const int* v_nonfinite;        // int32 flag: some V element is not finite, or null
    const int* cache_seqlens_k;    // int32 [batch]: keys per sequence (static cache / pool)
    int cache_batch_offset;        // static cache: first batch slot
    int cache_max_batch;           // static cache: batch slots of the layer
    const int* block_table;        // int32 [batch, max_blocks_per_seq] (paged pool)
    int block_size;                // pool rows per block (a power of two >= 16)
    int max_blocks_per_seq;        // block table row stride
};

/// The `qkv_prep` kernel: split of the projections into q, k, v (and the gate), q/k norm,
/// rope at explicit positions (templates/qkv_prep.cu).
struct PrepParams {
    const elem_t* qkv;             // linear_qkv (self) or linear_q (cross) output
    const elem_t* kv;              // linear_kv output (cross), or null
    elem_t* q_out;                 // [num_tokens, num_heads, HEAD_DIM]
    elem_t* k_out;                 // [num_kv_tokens, num_groups, HEAD_DIM]
    elem_t* v_out;
    elem_t* gate_out;              // [num_tokens, num_heads, HEAD_DIM] (output gate), or null
    const elem_t* q_norm_weight;   // [HEAD_DIM] each, or null
    const elem_t* q_norm_bias;
    const elem_t* k_norm_weight;
    const elem_t* k_norm_bias;
    float eps;                     // norm epsilon
    const int* positions;          // int32 [num_tokens] rope positions, or null
    float rotary_base;
    float mscale;                  // multiplies cos and sin
    int num_tokens;
    int num_kv_tokens;
    int num_heads;
    int num_groups;
    int* v_nonfinite;              // int32 flag raised when a written v is not finite, or null
};

/// The `append_kv` kernel: new k/v rows into a paged pool or a static cache
/// (templates/append_kv.cu).
struct AppendParams {
    const elem_t* k;               // [total_tokens, num_groups, HEAD_DIM]
    const elem_t* v;
    elem_t* k_dst;                 // pool [num_blocks, block_size, ...] or cache layer
    elem_t* v_dst;
    const int* cu_seqlens_q;       // int32 [batch + 1], or null (padded [s, batch] rows)
    const int* seqlens_k;          // int32 [batch]: keys after the append
    const int* block_table;        // int32 [batch, max_blocks_per_seq], or null (static)
    int batch;
    int num_groups;
    int block_size;
    int max_blocks_per_seq;
    int cache_batch_offset;        // static cache: first batch slot
    int cache_max_batch;           // static cache: batch slots
};

/// The paged mode of `decode_splitkv` (split and combine entries): the decode rows of a paged
/// mixed batch over the pool (templates/decode_splitkv.cu).
struct PagedDecodeParams {
    const elem_t* q;               // packed [total_q, num_heads, HEAD_DIM], already rotated
    const elem_t* k_pool;          // [num_blocks, block_size, num_groups, HEAD_DIM]
    const elem_t* v_pool;
    float* o_part;                 // f32 [num_splits, merge_rows, num_heads, HEAD_DIM]
    float* lse_part;               // f32 [num_splits, merge_rows, num_heads] (log2 units)
    elem_t* out;                   // packed, layout of q (the decode rows are written)
    float* lse;                    // f32 [num_heads, total_q] (natural log)
    const float* sinks;            // f32 [num_heads] learnable sink logits
    const elem_t* gate;            // output gate, layout of q
    const int* requests;           // int32 [batch]: the decode requests' indices in the batch
    const int* cu_seqlens_q;       // int32 [num_requests + 1] of the whole batch
    const int* seqlens_k;          // int32 [num_requests]: keys per request (new ones included)
    const int* block_table;        // int32 [num_requests, max_blocks_per_seq]
    const int* row_starts;         // int32 [batch + 1]: decode request b's query rows are merge rows row_starts[b] ..
    const int* row_tokens;         // int32 [merge_rows]: each merge row's packed token
    int batch;                     // decode requests (grid z of the split kernel)
    int merge_rows;                // their query rows, sum of q_len (grid x of the merge)
    int num_heads;
    int num_groups;
    int num_splits;
    int total_q;                   // rows of q (the lse stride)
    int block_size;                // a power of two >= 16
    int max_blocks_per_seq;
    float softmax_scale;
    int window_left;               // -1 = unbounded
    int window_right;
};

static_assert(LANE_D >= 1, "rows are whole warps of channels");

extern "C" __global__ void __launch_bounds__(128) append_kv_bf16_hd128_w4(const AppendParams p)
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
