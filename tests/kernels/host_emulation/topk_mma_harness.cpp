// Runs the launches of the mma.sync top-k kernels (cuda/topk.cu: topk_body and topk_split_body) on the host, for
// tests without a GPU.
//
//   topk_mma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel text is the source as NVRTC sees it (_build.source)
// with ptx.cuh skipped: topk_smem_model.h and ptx_host_model.h (ldmatrix.x4, mma.sync m16n8k16) stand for it.
// Those are warp-wide: every lane publishes its operands (addresses or fragment registers) in a per-thread slot,
// the warp meets at __syncwarp, and each lane assembles what the PTX ISA fragment layouts give it, so a wrong
// fragment mapping, swizzle or warp tile gives wrong selections. Products of two 16-bit values are exact in fp32;
// the 16 of one k-step are summed in fp32 in k order.
#include "harness_io.h"
#include "topk_smem_model.h"

#include "topk_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define K(NAME, T) {#NAME, {12, [](const std::vector<Arg>& a) { NAME(TOPK_ARGS(T, a)); }}},

const harness::Kernels kKernels = {
#include "topk_kernel_table.inc"
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("topk_mma_harness", argc, argv, kKernels); }
