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
/// leading and stride byte offsets (all >> 4), 128-byte swizzle (mode 1 in bits 62-63), kept
/// as its two 32-bit halves so that `gmma_at` steps the start address with one 32-bit add
/// (a 64-bit descriptor stepped by offset gets rebuilt whole: the compiler cannot see that
/// the 14-bit field never carries; ~10 instructions per wgmma on every product's issue path).
struct GmmaDesc {
    unsigned lo, hi;
};
__device__ __forceinline__ GmmaDesc gmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    GmmaDesc d;
    d.lo = ((addr & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16);
    d.hi = ((sbo >> 4) & 0x3FFF) | (1u << 30);
    return d;
}
/// The descriptor of the matrix `byte_off` bytes (a multiple of 16) after `d`'s: the start
/// address stays below the 256 KiB that its field spans (shared memory is at most 228 KiB),
/// so the add never carries out of it.
__device__ __forceinline__ unsigned long long gmma_at(GmmaDesc d, unsigned byte_off) {
    return ((unsigned long long)d.hi << 32) | (unsigned long long)(d.lo + (byte_off >> 4));
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
/// With COLS, when LOADERS is a multiple of CHUNKS and every thread's rows are whole 8-row
/// swizzle periods apart, a thread copies one column of rows STEP apart, so its shared and
/// global offsets are one base each plus constants (the general index math below costs ~20
/// instructions per 16-byte copy); the bases stay live, so callers short of registers (the
/// warp-specialized prefill's producer, under the consumers' register cap) pass false.
template <int ROWS, bool COLS = true>
__device__ __forceinline__ void load_tile(unsigned base, const elem_t* __restrict__ src, long long stride,
                                          int nvalid, int tid) {
    constexpr int STEP = LOADERS / CHUNKS;  // rows between one thread's copies (column form)
    if constexpr (COLS && LOADERS % CHUNKS == 0 && STEP % 8 == 0 && ROWS % STEP == 0) {
        const int r0 = tid / CHUNKS, ch = tid % CHUNKS;
        const unsigned s0 = base + sw_off<ROWS>(r0, ch);
        const elem_t* g0 = src + (long long)r0 * stride + ch * 8;
#pragma unroll
        for (int i = 0; i < ROWS / STEP; ++i) {
            const bool ok = r0 + i * STEP < nvalid;
            cp_async16(s0 + (unsigned)(i * STEP * 128), ok ? g0 + i * STEP * stride : src, ok);
        }
    } else {
#pragma unroll
        for (int c = tid; c < ROWS * CHUNKS; c += LOADERS) {
            const int r = c / CHUNKS;
            const int ch = c % CHUNKS;
            const bool ok = r < nvalid;
            const elem_t* g = ok ? src + (long long)r * stride + ch * 8 : src;
            cp_async16(base + sw_off<ROWS>(r, ch), g, ok);
        }
    }
}
