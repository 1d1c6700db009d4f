// What the top-k harnesses (topk_mma_harness, topk_wgmma_harness) model of ptx.cuh alike, included before their
// own models and the kernel text: ptx.cuh's text is skipped (MOBALAB_PTX_CUH), every head dim is built, the
// swizzle is ptx.cuh's own MOBA_SWZ_COL (ptx_swizzle.h, taken from ptx.cuh by the tests), topk.cuh's dynamic
// shared memory is the launch's (MOBA_TOPK_SMEM). In namespace moba: shared addresses as the kernels see them (the
// byte offset into the launch's dynamic shared memory plus 16, so that a kernel's own alignment of its tiles is
// exercised and an address outside the launch's shared memory fails), the float constants, and cp.async through
// cuda_host.h (landing only when the issuing thread waits).
#pragma once

#include <limits>

#include "cuda_host.h"

#define MOBALAB_PTX_CUH 1
#define MOBA_HAS_HEAD_DIM(d) 1
#define MOBA_TOPK_SMEM(name) unsigned char* name = emu::dynamic_smem()
#include "ptx_swizzle.h"

inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }

namespace moba {

constexpr unsigned kSmemBase = 16;
inline unsigned char* smem_ptr(unsigned addr, unsigned bytes) {
    if (addr < kSmemBase || addr - kSmemBase + bytes > emu::cta().smem_bytes)
        emu::fail("shared-memory address out of the launch's dynamic shared memory");
    return emu::dynamic_smem() + (addr - kSmemBase);
}
inline unsigned smem_u32(const void* p) {
    return kSmemBase + static_cast<unsigned>(static_cast<const unsigned char*>(p) - emu::dynamic_smem());
}
inline float neg_inf() { return -std::numeric_limits<float>::infinity(); }
inline float pos_inf() { return std::numeric_limits<float>::infinity(); }
inline float quiet_nan() { return std::numeric_limits<float>::quiet_NaN(); }

inline void cp_async16(unsigned dst, const void* src) { dec_cp_async16(smem_ptr(dst, 16), src); }
inline void cp_async16(void* dst, const void* src) { dec_cp_async16(dst, src); }
inline void cp_async_commit() { dec_cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    dec_cp_async_wait_n(N);
}

}  // namespace moba
