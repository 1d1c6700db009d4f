// Runs the launches of the certified wgmma top-k kernels (cuda/topk_wgmma_cert.cu: the certified kernel, the certify
// kernel and the exact kernel over the row list) on the host, for tests without a GPU.
//
//   topk_wgmma_cert_harness MANIFEST
//
// As topk_wgmma_harness.cpp (the kernel text as NVRTC sees it, wgmma_host_model.h after wgmma.cuh, the PTX helpers
// of ptx.cuh replaced by topk_smem_model.h), with these kernels' argument list: q, hi, lo, c16, norms, out, rows,
// counts, pending, then the eight integers of TOPK_ARGS.
#include "harness_io.h"
#include "topk_smem_model.h"

#define MOBA_TOPK_WG_SMEM(name) unsigned char* name = emu::dynamic_smem()

#define __CUDA_ARCH__ 800  // wgmma.cuh: encodings only; wgmma_host_model.h (included after it) models the rest

#include "topk_wgmma_cert_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define CERT_ARGS(T, a)                                                                                        \
    P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const __half>(a[3]), P<const float>(a[4]),         \
        P<int>(a[5]), P<int>(a[6]), P<int>(a[7]), P<int>(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]), I(a[13]), \
        I(a[14]), I(a[15]), I(a[16])

#define WGC(NAME, T)                                                                                           \
    {#NAME, {17, [](const std::vector<Arg>& a) {                                                               \
         NAME(CERT_ARGS(T, a));                                                                                \
         moba::wgmma_check_idle();                                                                             \
     }}}
#define KINDS(TAG, T, D, MODE, K) WGC(moba_topk_wgc_##TAG##_d##D##_##MODE##_k##K, T), \
                                  WGC(moba_topk_wgk_##TAG##_d##D##_##MODE##_k##K, T), \
                                  WGC(moba_topk_wgr_##TAG##_d##D##_##MODE##_k##K, T)
#define TIERS(TAG, T, D, MODE) KINDS(TAG, T, D, MODE, 8), KINDS(TAG, T, D, MODE, 16)
#define MODES(TAG, T, D) TIERS(TAG, T, D, causal), TIERS(TAG, T, D, full)

const harness::Kernels kKernels = {
    MODES(bf16, __nv_bfloat16, 64), MODES(fp16, __half, 64), MODES(bf16, __nv_bfloat16, 128), MODES(fp16, __half, 128),
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("topk_wgmma_cert_harness", argc, argv, kKernels); }
