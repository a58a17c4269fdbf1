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
