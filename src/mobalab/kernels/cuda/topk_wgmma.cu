// MoBA routing stage 2 on Hopper warpgroup MMAs: the exact top-k kernels (the body and its description:
// topk_wgmma.cuh), dtype x head dim (64, 128) x causal x list tier (k8 / k16), grouped by head dim under
// MOBA_HAS_HEAD_DIM.
#include "topk_wgmma.cuh"

#if MOBA_HAS_HEAD_DIM(64)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_causal_k8,       __nv_bfloat16,   64, true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_causal_k16,      __nv_bfloat16,   64, true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_full_k8,         __nv_bfloat16,   64, false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_full_k16,        __nv_bfloat16,   64, false, 16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_causal_k8,       __half,          64, true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_causal_k16,      __half,          64, true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_full_k8,         __half,          64, false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_full_k16,        __half,          64, false, 16)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_causal_k8,      __nv_bfloat16,  128, true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_causal_k16,     __nv_bfloat16,  128, true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_full_k8,        __nv_bfloat16,  128, false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_full_k16,       __nv_bfloat16,  128, false, 16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_causal_k8,      __half,         128, true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_causal_k16,     __half,         128, true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_full_k8,        __half,         128, false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_full_k16,       __half,         128, false, 16)
#endif
