// Runs the launches of the wgmma backward (cuda/attention_bwd_wgmma.cu, variant "wgmma": moba_bwd_wg_*) and of the
// kernels the backward wrapper runs around it on the host, for tests without a GPU: cuda/attention.cu (the
// key-block lists: keys, bounds), cuda/attention_bwd.cu (delta, row records, the deterministic dQ merge) and
// cuda/pairs.cu (the segments' longest-first order).
//
//   attention_bwd_wgmma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel texts are the sources as NVRTC sees them
// (_build.source), head dim 128 only, with ptx.cuh skipped (attention_model.h and ptx_host_model.h stand for it, as
// in attention_harness: named barriers, st.shared, ld.shared.v4, the vector fp32 atomics as plain adds).
// attention.cu's and attention_bwd.cu's texts come first, then pairs.cu's; then attention_bwd_wgmma.cu's finds
// attention_bwd.cuh, attention.cuh and ptx.cuh already defined, is compiled with __CUDA_ARCH__ = 800 so that wgmma.cuh
// gives only its encodings, and has wgmma_host_model.h included right after wgmma.cuh's text (the test inserts it).
// A thread that returns with wgmma groups it never waited for stops the run. The dQ warpgroup's bulk reductions and
// its bar.arrive hand-overs are cuda_host.h's models (a source must hold its bytes from the issue to the wait).
#include "harness_io.h"
#include "attention_model.h"

#include "pairs_model.h"

#include "attention_kernels.cu"
#include "attention_bwd_kernels.cu"
#include "pairs_kernels.cu"

#define __CUDA_ARCH__ 800  // wgmma.cuh: encodings only; wgmma_host_model.h (included after it) models the rest

// mbarrier.cuh: its text skipped; the kernel uses only its setmaxnreg, which every thread of a warpgroup executes
// (.sync.aligned: a warpgroup meeting here); register counts are not modelled.
#define MOBALAB_MBARRIER_CUH 1
namespace moba {
template <int N>
inline void setmaxnreg_inc() {
    emu::warpgroup_barrier();
}
template <int N>
inline void setmaxnreg_dec() {
    emu::warpgroup_barrier();
}
}  // namespace moba

#include "attention_bwd_wgmma_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

const harness::Kernels kKernels = {
#include "attention_bwd_wgmma_kernel_table.inc"
};

}  // namespace

int main(int argc, char** argv) {
    return harness::run_manifest("attention_bwd_wgmma_harness", argc, argv, kKernels);
}
