// ---------------------------------------------------------------------------------------
// sm_80 tensor-core helpers of the backward kernels (the same instructions as
// templates/fwd_fast.cu): cp.async 16-byte copies, ldmatrix, mma.sync m16n8k16 with f32
// accumulate, f32 -> {{ dtype }} packing, ex2.approx. Fragment layouts (PTX ISA, m16n8k16):
// A (16x16, row): a0 = (row g, cols 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 8+2t..),
// a3 = (g+8, 8+2t..); B (16x8, col): b0 = (k 2t..2t+1, col g), b1 = (k 8+2t.., g);
// C (16x8): c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..); g = lane / 4, t = lane % 4.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

/// 16-byte async copy global -> shared; `valid == false` zero-fills the destination.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 { %0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 { %0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

/// d += a (16x16, row) * b (16x8, col), f32 accumulate.
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.{{ dtype }}.{{ dtype }}.f32 "
        "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two floats -> packed pair of elem_t (`lo` in the low half), round to nearest even.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.{{ dtype }}x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

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
