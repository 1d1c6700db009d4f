// Runs the launches of the wgmma top-k kernels (cuda/topk_wgmma.cu) on the host, for tests without a GPU.
//
//   topk_wgmma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel text is the source as NVRTC sees it (_build.source)
// with wgmma_host_model.h included right after wgmma.cuh; the PTX helpers of ptx.cuh are replaced by the models
// below (cp.async through cuda_host.h: landing only when the issuing thread waits). A thread that returns with
// wgmma groups it never waited for stops the run.
#include "harness_io.h"

#include <limits>
#include <type_traits>

#define MOBALAB_PTX_CUH 1  // ptx.cuh's text is skipped: the models below stand for it
#define MOBA_HAS_HEAD_DIM(d) 1
#define MOBA_SWZ_COL(D, r, c) (((c) ^ ((r) & 7)) * 8)
#define MOBA_TOPK_WG_SMEM(name) unsigned char* name = emu::dynamic_smem()
#define __shared__  // only in the uninstantiated mma.sync body of topk.cuh (with __align__)
#undef __align__
#define __align__(n)

struct float2 {
    float x, y;
};
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }

namespace moba {
#include "topk_smem_model.h"
inline void cp_async16(unsigned dst, const void* src) { dec_cp_async16(smem_ptr(dst, 16), src); }
inline void cp_async16(void* dst, const void* src) { dec_cp_async16(dst, src); }
inline void cp_async_commit() { dec_cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    dec_cp_async_wait_n(N);
}
template <typename T>
struct Elem {};  // the mma.sync kernels of topk.cuh are not instantiated here
inline void ldmatrix_x4(unsigned, unsigned&, unsigned&, unsigned&, unsigned&) { emu::fail("ldmatrix: not modelled"); }
}  // namespace moba

#define __CUDA_ARCH__ 800  // wgmma.cuh: encodings only; wgmma_host_model.h (included after it) models the rest

#include "topk_wgmma_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define WG(NAME, T)                                                                                          \
    {#NAME, {11, [](const std::vector<Arg>& a) {                                                             \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<int>(a[3]), I(a[4]), I(a[5]), I(a[6]), \
              I(a[7]), I(a[8]), I(a[9]), I(a[10]));                                                          \
         const moba::WgmmaThread& t = moba::wgmma_me();                                                      \
         if (!t.open.empty() || !t.groups.empty())                                                           \
             emu::fail("a thread ended with wgmma groups it never waited for");                              \
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
