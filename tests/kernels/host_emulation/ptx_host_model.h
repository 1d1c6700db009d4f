// What the host harnesses model of cuda/ptx.cuh, whose text they skip (MOBALAB_PTX_CUH): in namespace moba,
// shared addresses as the kernels see them (the byte offset into the launch's dynamic shared memory plus 16, so
// that a kernel's own alignment of its tiles is exercised and an address outside the launch's shared memory
// fails), ldmatrix.x4 (plain and transposed) and mma.sync m16n8k16 / m16n8k8 through the warp-wide models
// below, the float constants, and cp.async through cuda_host.h. Included before the kernel text.
#pragma once

#include <limits>

#include "cuda_host.h"

// ldmatrix and mma.sync (moba:: below names them as ptx.cuh does), warp-wide: every lane publishes its
// operands (a row address or its fragment registers) in a per-thread slot, the warp meets, and each lane
// assembles what the PTX ISA fragment layouts give it, so a wrong fragment mapping or swizzle gives wrong
// outputs. Shared addresses are the byte offset into the launch's dynamic shared memory plus 16 (so an address
// outside it fails). Products of two 16-bit values are exact in fp32; the products of one k-step are summed in
// fp32 in k order.
namespace emu {
constexpr unsigned kSmemBase = 16;  // the shared address of the first byte of the launch's dynamic shared memory
inline unsigned (&mma_slots())[1024][6] {
    static unsigned slots[1024][6];
    return slots;
}
inline unsigned char* smem_at(unsigned addr, unsigned bytes) {
    if (addr < kSmemBase || addr - kSmemBase + bytes > cta().smem_bytes)
        fail("shared-memory address out of the launch's dynamic shared memory");
    return dynamic_smem() + (addr - kSmemBase);
}
inline float half_of(unsigned reg, int hi, __nv_bfloat16) {
    __nv_bfloat16 h;
    h.x = static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu);
    return __bfloat162float(h);
}
inline float half_of(unsigned reg, int hi, __half) {
    __half h;
    h.x = static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu);
    return __half2float(h);
}
// Four 8x8 b16 matrices, matrix i from the row addresses of lanes 8i .. 8i + 7; lane l receives elements
// 2 (l % 4), 2 (l % 4) + 1 of row l / 4 (trans: rows 2 (l % 4), 2 (l % 4) + 1 of column l / 4).
inline void ldsm_x4(unsigned addr, bool trans, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    unsigned* r[4] = {&r0, &r1, &r2, &r3};
    auto& slots = mma_slots();
    const int me = cta().current, base = warp_base(), l = lane();
    slots[me][0] = addr;
    __syncwarp();
    for (int i = 0; i < 4; ++i) {
        unsigned short e[2];
        for (int x = 0; x < 2; ++x) {
            const int row = trans ? 2 * (l % 4) + x : l / 4, col = trans ? l / 4 : 2 * (l % 4) + x;
            std::memcpy(&e[x], smem_at(slots[base + 8 * i + row][0] + 2 * col, 2), 2);
        }
        *r[i] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }
    __syncwarp();  // every lane has read the addresses before the next call overwrites them
}
// c += A (16 x K) B (K x 8), K = 16 (a: 4 registers, b: 2) or 8 (a: a[0], a[1]; b: b0): lane l = 4 g + t holds A
// rows g (a0, then a2 at k + 8) and g + 8 (a1, a3) at k 2t, 2t + 1; B column g at k 2t, 2t + 1 (b0) and 2t + 8,
// 2t + 9 (b1); C rows g (c0, c1) and g + 8 (c2, c3) at columns 2t, 2t + 1.
template <typename T>
inline void mma_k(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, int K) {
    auto& slots = mma_slots();
    const int me = cta().current, base = warp_base(), l = lane();
    for (int i = 0; i < 4; ++i) slots[me][i] = a[i];
    slots[me][4] = b0;
    slots[me][5] = b1;
    __syncwarp();
    const int g = l / 4, t = l % 4;
    float A[2][16], B[2][16];
    for (int tt = 0; tt < 4; ++tt) {
        const unsigned* sa = slots[base + 4 * g + tt];
        for (int e = 0; e < 2; ++e) {
            A[0][2 * tt + e] = half_of(sa[0], e, T());
            A[1][2 * tt + e] = half_of(sa[1], e, T());
            A[0][2 * tt + 8 + e] = K == 16 ? half_of(sa[2], e, T()) : 0.f;
            A[1][2 * tt + 8 + e] = K == 16 ? half_of(sa[3], e, T()) : 0.f;
        }
        for (int n = 0; n < 2; ++n) {
            const unsigned* sb = slots[base + 4 * (2 * t + n) + tt];
            for (int e = 0; e < 2; ++e) {
                B[n][2 * tt + e] = half_of(sb[4], e, T());
                B[n][2 * tt + 8 + e] = K == 16 ? half_of(sb[5], e, T()) : 0.f;
            }
        }
    }
    __syncwarp();
    for (int m = 0; m < 2; ++m)
        for (int n = 0; n < 2; ++n) {
            float acc = 0.f;
            for (int k = 0; k < K; ++k) acc += A[m][k] * B[n][k];
            c[2 * m + n] += acc;
        }
}
}  // namespace emu

#define MOBALAB_PTX_CUH 1

namespace moba {

inline unsigned char* smem_ptr(unsigned addr, unsigned bytes) { return emu::smem_at(addr, bytes); }

inline float neg_inf() { return -std::numeric_limits<float>::infinity(); }
inline float pos_inf() { return std::numeric_limits<float>::infinity(); }
inline float quiet_nan() { return std::numeric_limits<float>::quiet_NaN(); }

// cp.async through cuda_host.h: the 16 bytes land only when the issuing thread waits for their group
inline void cp_async16(unsigned dst, const void* src) { dec_cp_async16(smem_ptr(dst, 16), src); }
inline void cp_async16(void* dst, const void* src) { dec_cp_async16(dst, src); }
inline void cp_async_commit() { dec_cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    dec_cp_async_wait_n(N);
}
// bar.sync id, n and bar.arrive id, n: cuda_host.h's named barriers
inline void bar_sync(int id, int nthreads) { emu::named_barrier(id, (unsigned)nthreads); }
inline void bar_arrive(int id, int nthreads) { emu::named_arrive(id, (unsigned)nthreads); }
// bulk reductions through cuda_host.h: the source taken at the issue, the adds landing at the thread's wait
inline void bulk_reduce_add_f32(float* dst, unsigned src, unsigned bytes) {
    dec_bulk_reduce_add_f32(dst, smem_ptr(src, bytes), bytes);
}
inline void bulk_reduce_add_16(__nv_bfloat16* dst, unsigned src, unsigned bytes) {
    dec_bulk_reduce_add_16(dst, smem_ptr(src, bytes), bytes);
}
inline void bulk_reduce_add_16(__half* dst, unsigned src, unsigned bytes) {
    dec_bulk_reduce_add_16(dst, smem_ptr(src, bytes), bytes);
}
inline void bulk_commit_group() { dec_bulk_commit(); }
template <int N>
inline void bulk_wait_group_read() {
    dec_bulk_wait_n(N);
}
template <int N>
inline void bulk_wait_group() {
    dec_bulk_wait_n(N);
}
inline unsigned smem_u32(const void* p) {
    return emu::kSmemBase + static_cast<unsigned>(static_cast<const unsigned char*>(p) - emu::dynamic_smem());
}

inline void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    emu::ldsm_x4(addr, false, r0, r1, r2, r3);
}
inline void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    emu::ldsm_x4(addr, true, r0, r1, r2, r3);
}

inline unsigned pack2(float lo, float hi, __nv_bfloat16) {
    return (unsigned)__float2bfloat16_rn(lo).x | ((unsigned)__float2bfloat16_rn(hi).x << 16);
}
inline unsigned pack2(float lo, float hi, __half) {
    return (unsigned)__float2half_rn(lo).x | ((unsigned)__float2half_rn(hi).x << 16);
}
inline __nv_bfloat16 from_float(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }
inline __half from_float(float x, __half) { return __float2half_rn(x); }

template <typename T>
struct Elem {
    static float to_float(T x) { return static_cast<float>(x); }
    static T from_float(float x) { return moba::from_float(x, T()); }
    // two floats rounded to nearest (even) into one b32 register, lo in the low half
    static unsigned pack(float lo, float hi) { return pack2(lo, hi, T()); }
    static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        emu::mma_k<T>(c, a, b0, b1, 16);
    }
    static void mma_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
        const unsigned a[4] = {a0, a1, 0u, 0u};
        emu::mma_k<T>(c, a, b0, 0u, 8);
    }
};

}  // namespace moba
