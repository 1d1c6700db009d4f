// Runs the launches of the attention kernels on the host, for tests without a GPU: cuda/attention.cu (the forward
// tile kernels, resident and streaming, the merge, and the key-block list kernels: keys, bounds, segments) and
// cuda/attention_bwd.cu (delta, row records, the backward tile kernel, the deterministic dQ merge).
//
//   attention_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel texts are the sources as NVRTC sees them
// (_build.source) with ptx.cuh skipped: attention_model.h and ptx_host_model.h (ldmatrix.x4, mma.sync m16n8k16)
// stand for it. Those are warp-wide: every lane publishes its operands in a per-thread slot, the warp meets at
// __syncwarp, and each lane assembles what the PTX ISA fragment layouts give it, so a wrong fragment mapping,
// swizzle or warp tile gives wrong outputs or gradients. Products of two 16-bit values are exact in fp32; the 16
// of one k-step are summed in fp32 in k order.
#include "harness_io.h"
#include "attention_model.h"

#include "attention_kernels.cu"
#include "attention_bwd_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

const harness::Kernels kKernels = {
#include "attention_kernel_table.inc"
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("attention_harness", argc, argv, kKernels); }
