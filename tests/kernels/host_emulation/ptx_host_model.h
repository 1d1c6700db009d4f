// What the host harnesses model of cuda/ptx.cuh, whose text they skip (MOBALAB_PTX_CUH): in namespace moba,
// shared addresses as the kernels see them (the byte offset into the launch's dynamic shared memory plus 16, so
// that a kernel's own alignment of its tiles is exercised and an address outside the launch's shared memory
// fails), ldmatrix.x4 (plain and transposed) and mma.sync m16n8k16 / m16n8k8 through cuda_host.h's warp-wide
// models. Included before the kernel text.
#pragma once

#include "cuda_host.h"

#define MOBALAB_PTX_CUH 1

namespace moba {

inline unsigned char* smem_ptr(unsigned addr, unsigned bytes) { return emu::smem_at(addr, bytes); }
inline unsigned smem_u32(const void* p) {
    return emu::kSmemBase + static_cast<unsigned>(static_cast<const unsigned char*>(p) - emu::dynamic_smem());
}

inline void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    emu::ldsm_x4(addr, false, r0, r1, r2, r3);
}
inline void ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    emu::ldsm_x4(addr, true, r0, r1, r2, r3);
}

template <typename T>
struct Elem {
    static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        emu::mma_k<T>(c, a, b0, b1, 16);
    }
    static void mma_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
        const unsigned a[4] = {a0, a1, 0u, 0u};
        emu::mma_k<T>(c, a, b0, 0u, 8);
    }
};

}  // namespace moba
