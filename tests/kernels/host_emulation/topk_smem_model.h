// What the top-k harnesses (topk_mma_harness, topk_wgmma_harness) model of ptx.cuh alike, included before their
// own models and the kernel text: ptx_host_model.h (ptx.cuh's text skipped: shared addresses, ldmatrix, mma.sync,
// the float constants and cp.async), every head dim built, the swizzle ptx.cuh's own MOBA_SWZ_COL (ptx_swizzle.h,
// taken from ptx.cuh by the tests), topk.cuh's dynamic shared memory the launch's (MOBA_TOPK_SMEM); and the
// argument list the top-k kernels share (TOPK_ARGS).
#pragma once

#include <limits>

#include "cuda_host.h"
#include "ptx_host_model.h"
#define MOBA_HAS_HEAD_DIM(d) 1
#define MOBA_TOPK_SMEM(name) unsigned char* name = emu::dynamic_smem()
#include "ptx_swizzle.h"

inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }

// The 12 arguments of a top-k kernel (topk.cu and topk_wgmma.cu share the signature) from a manifest line a.
#define TOPK_ARGS(T, a)                                                                                    \
    P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<int>(a[3]), I(a[4]), I(a[5]), I(a[6]), I(a[7]), \
        I(a[8]), I(a[9]), I(a[10]), I(a[11])
