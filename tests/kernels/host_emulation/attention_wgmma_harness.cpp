// Runs the launches of the wgmma forward (cuda/attention_wgmma.cu, variant "wgmma": moba_attn_wg_*) and of the
// attention.cu kernels around it (the key-block lists and the merge) on the host, for tests without a GPU.
//
//   attention_wgmma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel texts are the sources as NVRTC sees them
// (_build.source), head dim 128 only, with ptx.cuh skipped (attention_model.h and ptx_host_model.h stand for it,
// as in attention_harness). attention.cu's text comes first; attention_wgmma.cu's then finds attention.cuh and
// ptx.cuh already defined, is compiled with __CUDA_ARCH__ = 800 so that wgmma.cuh gives only its encodings, and has
// wgmma_host_model.h included right after wgmma.cuh's text (the test inserts it); the test also rewrites two forms
// of declaration that CUDA accepts and the host compiler does not with attention_model.h's `__shared__` (static):
// the `extern __shared__` dynamic shared memory (into MOBA_DYNAMIC_SMEM, the launch's buffer) and `__shared__
// alignas(8)` (into `alignas(8) __shared__`). mbarrier.cuh, the pipeline of the warp-specialised kernels
// (moba_attn_wgws_*, variant "wgmma-ws"), is not modelled: its text is skipped and each of its operations stops the
// run; those kernels are compiled but not in the kernel table. A thread that returns with wgmma groups it never
// waited for stops the run.
#include "harness_io.h"
#include "attention_model.h"

#include "attention_kernels.cu"

#define MOBALAB_MBARRIER_CUH 1  // mbarrier.cuh: not modelled

inline void __trap() { emu::fail("__trap"); }

namespace moba {

inline void emu_no_mbarriers() { emu::fail("mbarriers and setmaxnreg are not modelled (variant wgmma-ws)"); }
inline void mbar_init(unsigned, unsigned) { emu_no_mbarriers(); }
inline void mbar_arrive(unsigned) { emu_no_mbarriers(); }
inline void mbar_arrive_cp_async(unsigned) { emu_no_mbarriers(); }
inline void mbar_wait(unsigned, unsigned) { emu_no_mbarriers(); }
template <int N>
inline void setmaxnreg_inc() {
    emu_no_mbarriers();
}
template <int N>
inline void setmaxnreg_dec() {
    emu_no_mbarriers();
}

}  // namespace moba

#define __CUDA_ARCH__ 800  // wgmma.cuh: encodings only; wgmma_host_model.h (included after it) models the rest

#include "attention_wgmma_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

const harness::Kernels kKernels = {
#include "attention_wgmma_kernel_table.inc"
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("attention_wgmma_harness", argc, argv, kKernels); }
