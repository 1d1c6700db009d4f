// Runs the launches of the wgmma top-k kernels (cuda/topk_wgmma.cu) on the host, for tests without a GPU.
//
//   topk_wgmma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel text is the source as NVRTC sees it (_build.source)
// with wgmma_host_model.h included right after wgmma.cuh; the PTX helpers of ptx.cuh are replaced by
// topk_smem_model.h. A thread that returns with wgmma groups it never waited for stops the run.
#include "harness_io.h"
#include "topk_smem_model.h"

#define MOBA_TOPK_WG_SMEM(name) unsigned char* name = emu::dynamic_smem()

#define __CUDA_ARCH__ 800  // wgmma.cuh: encodings only; wgmma_host_model.h (included after it) models the rest

#include "topk_wgmma_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define WG(NAME, T)                                                                                          \
    {#NAME, {12, [](const std::vector<Arg>& a) {                                                             \
         NAME(TOPK_ARGS(T, a));                                                                              \
         moba::wgmma_check_idle();                                                                           \
     }}}

const harness::Kernels kKernels = {
    WG(moba_topk_wg_bf16_d64_causal_k8, __nv_bfloat16),   WG(moba_topk_wg_bf16_d64_causal_k16, __nv_bfloat16),
    WG(moba_topk_wg_bf16_d64_full_k8, __nv_bfloat16),     WG(moba_topk_wg_bf16_d64_full_k16, __nv_bfloat16),
    WG(moba_topk_wg_fp16_d64_causal_k8, __half),          WG(moba_topk_wg_fp16_d64_causal_k16, __half),
    WG(moba_topk_wg_fp16_d64_full_k8, __half),            WG(moba_topk_wg_fp16_d64_full_k16, __half),
    WG(moba_topk_wg_bf16_d128_causal_k8, __nv_bfloat16),  WG(moba_topk_wg_bf16_d128_causal_k16, __nv_bfloat16),
    WG(moba_topk_wg_bf16_d128_full_k8, __nv_bfloat16),    WG(moba_topk_wg_bf16_d128_full_k16, __nv_bfloat16),
    WG(moba_topk_wg_fp16_d128_causal_k8, __half),         WG(moba_topk_wg_fp16_d128_causal_k16, __half),
    WG(moba_topk_wg_fp16_d128_full_k8, __half),           WG(moba_topk_wg_fp16_d128_full_k16, __half),
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("topk_wgmma_harness", argc, argv, kKernels); }
