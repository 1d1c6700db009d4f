// Runs the launches of one MoBA decode step (cuda/decode.cu) on the host, for tests without a GPU.
//
//   decode_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h.
#include "harness_io.h"

#include "decode_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define STEP(NAME, T)                                                                                          \
    {#NAME, {31, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const float>(a[3]), P<const int>(a[4]),    \
              P<int>(a[5]), P<float>(a[6]), P<int>(a[7]), P<float>(a[8]), P<float>(a[9]), P<unsigned>(a[10]),     \
              P<T>(a[11]), P<float>(a[12]), I(a[13]), I(a[14]), I(a[15]), I(a[16]), I(a[17]), I(a[18]), I(a[19]), \
              I(a[20]), I(a[21]), I(a[22]), I(a[23]), I(a[24]), I(a[25]), I(a[26]), I(a[27]), I(a[28]), I(a[29]), \
              a[30].f);                                                                                          \
     }}}

const harness::Kernels kKernels = {
    STEP(moba_decode_step_bf16_d64, __nv_bfloat16),
    STEP(moba_decode_step_bf16_d128, __nv_bfloat16),
    STEP(moba_decode_step_fp16_d64, __half),
    STEP(moba_decode_step_fp16_d128, __half),
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("decode_harness", argc, argv, kKernels); }
