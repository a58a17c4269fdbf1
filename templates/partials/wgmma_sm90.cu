// ---------------------------------------------------------------------------------------
// What the wgmma kernels (templates/prefill_sm90.cu, backward_dqdkdv_sm90.cu) share: the
// 128-byte-swizzled shared-memory tile layout and its cp.async loader, the shared-memory
// matrix descriptor, and the wgmma fence / commit / wait. Needs partials/types.cu and
// cp_async.cu first, and LOADERS (the threads that call load_tile).
// ---------------------------------------------------------------------------------------

/// Byte offset of 16-byte chunk `ch` of row `r` in a swizzled tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ unsigned sw_off(int r, int ch) {
    return (unsigned)((ch >> 3) * ROWS * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

/// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
/// leading and stride byte offsets (all >> 4), 128-byte swizzle (mode 1 in bits 62-63).
__device__ __forceinline__ unsigned long long gmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/// Keeps the compiler from moving accesses of an accumulator register across the async MMAs.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

/// Async copy of ROWS rows (HEAD_DIM elements each, global row stride `stride` elements) into
/// a swizzled tile by the LOADERS threads (`tid` in 0..LOADERS); rows at or past `nvalid` are
/// zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_tile(unsigned base, const elem_t* __restrict__ src, long long stride,
                                          int nvalid, int tid) {
#pragma unroll
    for (int c = tid; c < ROWS * CHUNKS; c += LOADERS) {
        const int r = c / CHUNKS;
        const int ch = c % CHUNKS;
        const bool ok = r < nvalid;
        const elem_t* g = ok ? src + (long long)r * stride + ch * 8 : src;
        cp_async16(base + sw_off<ROWS>(r, ch), g, ok);
    }
}
