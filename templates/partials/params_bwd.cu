// ---------------------------------------------------------------------------------------
// The backward family's parameter struct, apart from partials/params.cu so that adding it
// changed no forward kernel's source (the catalog's). Same rules as there: the host twin is
// `BwdParams` in attention-runtime/src/cuda/params.rs, checked by
// tests/nvrtc_params_layout.rs; kernels take it by value (`const BwdParams p`).
// ---------------------------------------------------------------------------------------
/// The attention backward family (templates/backward_preprocess.cu, backward_sm80.cu):
/// gradients of q, k, v (and learnable sinks) from the forward's saved out and LSE.
struct BwdParams {
    const elem_t* q;               // layout of the forward's q
    const elem_t* k;               // layout of the forward's k
    const elem_t* v;
    const elem_t* out;             // the forward's output, layout of q
    const elem_t* dout;            // gradient of out, layout of q
    const float* lse;              // the forward's f32 [num_heads, total_q] LSE (natural log)
    float* dpsum;                  // f32 [num_heads, total_q]: D = rowsum(dout * out)
    elem_t* dq;                    // layout of q
    elem_t* dk;                    // layout of k
    elem_t* dv;                    // layout of v
    const int* cu_seqlens_q;       // int32 [batch + 1] (packed) or null (padded)
    const int* cu_seqlens_k;       // int32 [batch + 1] (packed) or null
    const float* sinks;            // f32 [num_heads] learnable sink logits, or null
    float* dsinks;                 // f32 [num_heads] their gradient, or null
    int batch;                     // sequences
    int num_heads;                 // query heads
    int num_groups;                // K/V groups (divides num_heads)
    int seqlen_q;                  // padded query length; packed: the longest
    int seqlen_k;                  // padded key length; packed: the longest
    float softmax_scale;           // logit scale
    int window_left;               // sliding window, -1 = unbounded
    int window_right;
    int total_q;                   // query rows of every sequence (the lse / dpsum stride)
    int total_k;                   // key rows of every sequence
    const unsigned char* mask;     // uint8 [b, h, i, j] at the strides below, nonzero = masked
    long long mask_stride_b;       // (mask-tensor variants only; stride 0 broadcasts)
    long long mask_stride_h;
    long long mask_stride_q;
    long long mask_stride_k;
    const float* bias;             // f32 additive post-scale bias [b, h, i, j] at the strides below
    long long bias_stride_b;       // (bias variants only; stride 0 broadcasts)
    long long bias_stride_h;
    long long bias_stride_q;
    long long bias_stride_k;
    float* dbias;                  // f32 [batch, num_heads, seqlen_q, seqlen_k] dense gradient of
                                   // the bias (bias variants; zero-filled by the host), or null
    float* dq_accum;               // f32, q's rows x heads x head_dim: dQ / softmax_scale summed by
                                   // atomics (the fused backward_dqdkdv kernel; _sm90: columns
                                   // permuted in groups of 16; zeroed by the preprocess kernel), or null
};
