// MoBA attention backward on Hopper warpgroup MMAs (see attention_bwd_wgmma.cuh for the design; the delta and dQ
// merge kernels are attention_bwd.cu's):
//   moba_bwd_wg_<dtype>_d128        dtype in {bf16, f16}: one CTA of two warpgroups per 128 keys of a key block;
//                                   dynamic shared memory 148 KB + 1 KB of alignment slack
//   moba_bwd_wg_<dtype>_d128_dq16   the same with the atomic dQ added into a dQ of the input type (dq_mode 0)
// attention_bwd.cu's main kernels' parameters (MOBA_BWD_KERNEL) with the delta launch's row stats in place of the row
// records and three more (MOBA_BWD_WG_KERNEL): the kernels build their records themselves.
// sm_90a only (wgmma).
#include "attention_bwd_wgmma.cuh"

#if MOBA_HAS_HEAD_DIM(128)
// one CTA per SM: the launch's 168 registers a thread, re-allocated by setmaxnreg
MOBA_BWD_WG_KERNEL(moba_bwd_wg_bf16_d128, bwd_wgmma, (MOBA_BWD_WG_THREADS, 1), __nv_bfloat16, 128)
MOBA_BWD_WG_KERNEL(moba_bwd_wg_f16_d128,  bwd_wgmma, (MOBA_BWD_WG_THREADS, 1), __half,        128)
MOBA_BWD_WG_KERNEL(moba_bwd_wg_bf16_d128_dq16, bwd_wgmma_dq16, (MOBA_BWD_WG_THREADS, 1), __nv_bfloat16, 128)
MOBA_BWD_WG_KERNEL(moba_bwd_wg_f16_d128_dq16,  bwd_wgmma_dq16, (MOBA_BWD_WG_THREADS, 1), __half,        128)
#endif
