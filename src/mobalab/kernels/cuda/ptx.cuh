// PTX wrappers shared by every kernel (routing, attention forward and backward), and the element-type
// traits that pick the matching tensor-core instruction (plus the IEEE special values as bit patterns).
//
// Tensor cores are driven with inline PTX (ldmatrix + mma.sync m16n8k16, fp32 accumulate) rather than
// <mma.h>, which NVRTC cannot include (see docs/design.md, "Building and launching kernels"). Every helper
// is __device__, so plain nvcc (CI) and NVRTC (run time) compile the same text.
#ifndef MOBALAB_PTX_CUH
#define MOBALAB_PTX_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Instantiation filter: built with -DMOBA_HEAD_DIM=d, a source exports the kernels of head dim d and the
// head-dim-free ones only; without it (or with 0), every head dim, as the nvcc compile check builds it.
// NVRTC's compile time grows with the instantiations (five head dims take two to three times as long as the
// two of before for a whole source, one head dim a fifth of that), so a wrapper compiles one module per head dim.
#ifndef MOBA_HEAD_DIM
#define MOBA_HEAD_DIM 0
#endif
#define MOBA_HAS_HEAD_DIM(d) (MOBA_HEAD_DIM == 0 || MOBA_HEAD_DIM == (d))

// sm_90 instructions with an older form (the vector RED below): used where the target has them; built with
// -DMOBA_PORTABLE=1 the older form on any target, so that a Hopper's GPU tests run what an sm_80 / 86 / 89 GPU runs.
#ifndef MOBA_PORTABLE
#define MOBA_PORTABLE 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !MOBA_PORTABLE
#define MOBA_SM90 1
#else
#define MOBA_SM90 0
#endif

// The dynamic shared memory of the attention kernels (the host emulation of the tests puts its own in place).
#ifndef MOBA_DYNAMIC_SMEM
#define MOBA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace moba {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// 32-bit shared-memory address of a generic pointer into shared memory (the operand ldmatrix, cp.async
// and st.shared take).
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// The same with the destination as a generic pointer into shared memory.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) { cp_async16(smem_u32(dst), src); }
// The same with a source size: bytes src_bytes .. 15 of the destination are zero-filled (0 = all zeros,
// and src is then not read).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// The same with cp.async's ignore-src predicate: `zero` writes 16 zero bytes and does not read src. One
// predicated LDGSTS, where a source size selected from a condition costs ptxas ~10 instructions of arithmetic.
__device__ __forceinline__ void cp_async16_zero_if(unsigned dst, const void* src, bool zero) {
  asm volatile(
      "{\n .reg .pred z;\n setp.ne.b32 z, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, z;\n}\n" ::"r"(dst),
      "l"(src), "r"(static_cast<int>(zero))
      : "memory");
}
// 8-byte global -> shared copy (cp.async.ca: .cg takes 16 bytes only), bytes src_bytes .. 7 zero-filled (0: src not
// read).
__device__ __forceinline__ void cp_async8(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i .. 8i+7 give the row addresses of matrix i, which lands in ri.
__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                            unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                                  unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void st_shared_b32(unsigned addr, unsigned v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_v2_f32(unsigned addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads) over `nthreads` threads (whole warps): two warps that trade
// fragments through shared memory wait for each other only, not for the whole CTA.
__device__ __forceinline__ void bar_sync(int id, int nthreads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}

// Arrival at barrier `id` over `nthreads` threads without waiting (bar.arrive): a producer tells its consumers
// that a buffer is ready, or they tell it that a buffer is free, and goes on. Memory accesses before it are
// ordered before those of the threads that bar.sync on the same barrier after it completes.
__device__ __forceinline__ void bar_arrive(int id, int nthreads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}

// Bulk reductions (sm_90; PTX ISA 8.x, "cp.reduce.async.bulk"): the bulk copy engine adds `bytes` (a multiple of
// 16, both addresses 16-byte aligned) of fp32 values from shared memory into global memory, atomically per element
// (relaxed, GPU scope), asynchronously. An operation joins the executing thread's current bulk async-group;
// cp.async.bulk.commit_group closes the group, cp.async.bulk.wait_group.read N returns once the sources of all but
// the newest N groups have been read (the shared memory may be rewritten), cp.async.bulk.wait_group N once they
// are complete. Shared memory written by generic stores needs fence.proxy.async.shared::cta (wgmma.cuh) between
// the stores and the operation, since the copy engine reads it through the async proxy.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, unsigned src, unsigned bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
// The same into 16-bit values (`.noftz`: subnormal sums kept): bf16 or fp16 by the destination's type.
__device__ __forceinline__ void bulk_reduce_add_16(__nv_bfloat16* dst, unsigned src, unsigned bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.noftz.bf16 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_reduce_add_16(__half* dst, unsigned src, unsigned bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.noftz.f16 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// Vector fp32 atomic add, result unused: one RED instruction for two (four) floats on sm_90, one atomicAdd per
// float before it (the same sums: each element is added atomically either way).
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if MOBA_SM90
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}
__device__ __forceinline__ void red_add4(float* p, float4 v) {
#if MOBA_SM90
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}
// 16-byte global store if `pred` (a predicated STG: no branch around it).
__device__ __forceinline__ void st_global_v4_if(void* p, float4 v, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q st.global.v4.f32 [%0], {%1, %2, %3, %4};\n}\n" ::"l"(p),
               "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(static_cast<int>(pred))
               : "memory");
}
__device__ __forceinline__ float4 ld_shared_v4_f32(unsigned addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr));
  return v;
}

// Tiles of D 2-byte elements per row, stored as 16-byte chunks, XOR-swizzled so that the 8 rows of any
// ldmatrix 8x8 matrix (8 consecutive rows, one logical chunk) hit 8 different 16-byte bank groups.
// Rows of 128*m bytes (D = 64, 128, 256): chunk c of row r lives at c ^ (r & 7).
// Rows of 64 bytes (D = 32) or 192 bytes (D = 96) start alternately at bank group 0 and 4, so row r adds
// 4 * (r & 1) to the bank group and the XOR takes the other rows apart: whole groups of 8 chunks use
// c ^ (r & 7) (bank group (c ^ r ^ 4 (r & 1)) mod 8, distinct over 8 rows), the trailing 4 chunks of a row
// (all of D = 32, chunks 8..11 of D = 96) use c ^ ((r >> 1) & 3) (the four rows of one parity get four
// different chunks, the parity the other half of the banks).
template <int D>
__device__ __forceinline__ int swz_chunk(int row, int chunk) {
  static_assert(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, "head dim 32, 64, 96, 128 or 256");
  if constexpr (D % 64 == 0) {
    return chunk ^ (row & 7);
  } else {
    constexpr int FULL = (D / 64) * 8;  // chunks in whole groups of 8: 0 (D = 32) or 8 (D = 96)
    return chunk < FULL ? (chunk ^ (row & 7)) : (chunk ^ ((row >> 1) & 3));
  }
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of D 2-byte elements per row.
template <int D>
__device__ __forceinline__ unsigned swz(int row, int chunk) {
  if constexpr (D % 64 == 0) {
    return static_cast<unsigned>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
  } else {
    return static_cast<unsigned>(row * (D * 2) + (swz_chunk<D>(row, chunk) << 4));
  }
}

// The same layout indexed in elements: chunk c of row r starts at element r * D + MOBA_SWZ_COL(D, r, c). A
// macro, not a function, written at the call site as that sum: NVRTC 13.2 compiles a force-inlined helper,
// or even a differently associated sum (p + (r * D + x) for p + r * D + x), to other (equivalent) SASS, and
// the top-k kernels of head dims 64 and 128 keep the code they were measured with.
#define MOBA_SWZ_COL(D, r, c) \
  (((((D) % 64) == 0 || (c) < ((D) / 64) * 8) ? ((c) ^ ((r) & 7)) : ((c) ^ (((r) >> 1) & 3))) << 3)

// 16-bit element types: conversions, packing two floats into one b32 register (rounded to nearest), and
// mma(c, a, b0, b1): c += A (16x16, row-major, 4 regs) * B (16x8, column-major, 2 regs), fp32 accumulators;
// mma_k8(c, a0, a1, b0): c += A (16x8, row-major, 2 regs) * B (8x8, column-major, 1 reg).
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static unsigned pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void mma_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static unsigned pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void mma_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};

}  // namespace moba

#endif  // MOBALAB_PTX_CUH
