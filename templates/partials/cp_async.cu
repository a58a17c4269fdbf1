// ---------------------------------------------------------------------------------------
// cp.async helpers (sm_80+) of the tensor-core kernels (prefill_sm80.cu, prefill_sm90.cu,
// decode_splitkv.cu, the backward kernels): the shared-space address of a pointer, the
// 16-byte global -> shared copy, commit and wait. The copy zero-fills when `valid` is false;
// a template that sets `cp_async_always = true` before the include gets instead the form
// without that operand (every copy whole: decode_splitkv.cu).
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

{%- if cp_async_always | default(value=false) %}
/// 16-byte async copy global -> shared, always all 16 bytes.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
{%- else %}
/// 16-byte async copy global -> shared; `valid == false` zero-fills the destination.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
{%- endif %}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
