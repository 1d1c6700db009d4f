// Small device helpers for the MoBA routing kernels (centroids.cu, topk.cu).
//
// Tensor cores are driven with inline PTX (ldmatrix + mma.sync m16n8k16), the path verified under NVRTC
// (shared/reference/toolkit-conventions.md §1.5): `#include <mma.h>` fails on the GPU image.
// Every helper is `__device__` so plain nvcc (CI) and NVRTC (run time) compile the same text.
#ifndef MOBALAB_ROUTING_MMA_CUH
#define MOBALAB_ROUTING_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Element-type traits: conversions and the matching mma.sync instruction.
template <typename T> struct RoutingType;

template <> struct RoutingType<__nv_bfloat16> {
    __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    // D += A(16x16, row) * B(16x8, col), fp32 accumulators.
    __device__ __forceinline__ static void mma(float* d, const unsigned* a, const unsigned* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

template <> struct RoutingType<__half> {
    __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
    __device__ __forceinline__ static void mma(float* d, const unsigned* a, const unsigned* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

__device__ __forceinline__ unsigned routing_smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg).
__device__ __forceinline__ void routing_cp_async16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(routing_smem_addr(smem_dst)),
                 "l"(gmem_src)
                 : "memory");
}

__device__ __forceinline__ void routing_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void routing_cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, which lands in r[i].
__device__ __forceinline__ void routing_ldmatrix_x4(unsigned* r, const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(routing_smem_addr(smem_row)));
}

__device__ __forceinline__ float routing_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float routing_nan() { return __int_as_float(0x7fc00000); }

#endif  // MOBALAB_ROUTING_MMA_CUH
