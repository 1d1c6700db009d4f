// Runs the launches of the mma.sync top-k kernels (cuda/topk.cu: topk_body and topk_split_body) on the host, for
// tests without a GPU.
//
//   topk_mma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel text is the source as NVRTC sees it (_build.source)
// with ptx.cuh skipped: topk_smem_model.h and the ldmatrix.x4 / mma.sync m16n8k16 of cuda_host.h stand for it.
// Those are warp-wide: every lane publishes its operands (addresses or fragment registers) in a per-thread slot,
// the warp meets at __syncwarp, and each lane assembles what the PTX ISA fragment layouts give it, so a wrong
// fragment mapping, swizzle or warp tile gives wrong selections. Products of two 16-bit values are exact in fp32;
// the 16 of one k-step are summed in fp32 in k order.
#include "harness_io.h"
#include "topk_smem_model.h"

namespace moba {

// ldmatrix.x4 and mma.sync m16n8k16 as ptx.cuh names them: cuda_host.h's warp-wide models.
inline void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    unsigned r[4];
    emu::ldsm_x4(addr, r, false);
    r0 = r[0];
    r1 = r[1];
    r2 = r[2];
    r3 = r[3];
}

template <typename T>
struct Elem {
    static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        emu::mma_k<T>(c, a, b0, b1, 16);
    }
};
}  // namespace moba

#include "topk_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define K(NAME, T)                                                                                           \
    {#NAME, {11, [](const std::vector<Arg>& a) {                                                             \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<int>(a[3]), I(a[4]), I(a[5]), I(a[6]), \
              I(a[7]), I(a[8]), I(a[9]), I(a[10]));                                                          \
     }}},

const harness::Kernels kKernels = {
#include "topk_kernel_table.inc"
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("topk_mma_harness", argc, argv, kKernels); }
