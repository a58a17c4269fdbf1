// ---------------------------------------------------------------------------------------
// f32 -> {{ dtype }} pair packing and ex2.approx, shared by the tensor-core kernels
// (prefill_sm80.cu, prefill_sm90.cu, decode_splitkv.cu, the backward kernels); a template
// that sets `pack_only = true` before the include gets pack2 alone (decode_splitkv.cu).
// ---------------------------------------------------------------------------------------

/// Two floats -> packed pair of elem_t (`lo` in the low half), round to nearest even.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.{{ dtype }}x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

{%- if not pack_only | default(value=false) %}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
{%- endif %}
