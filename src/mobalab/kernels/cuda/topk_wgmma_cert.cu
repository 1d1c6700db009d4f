// MoBA routing stage 2 on Hopper warpgroup MMAs, certified: one fp16 MMA per centroid chunk and a certificate per
// row (topk_wgmma.cuh, "Certified scores"), then the exact kernel over the rows it leaves undecided. Kernels
// moba_topk_wgc_* (certified) and moba_topk_wgr_* (the row list, exact), dtype x head dim (64, 128) x causal x list
// tier (k8 / k16; the certified list holds one entry more than it selects), grouped by head dim under
// MOBA_HAS_HEAD_DIM.
#include "topk_wgmma.cuh"

#if MOBA_HAS_HEAD_DIM(64)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d64_causal_k8,       __nv_bfloat16,   64, true,   8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d64_causal_k8,       __nv_bfloat16,   64, true,   8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d64_causal_k16,      __nv_bfloat16,   64, true,  16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d64_causal_k16,      __nv_bfloat16,   64, true,  16, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d64_full_k8,         __nv_bfloat16,   64, false,  8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d64_full_k8,         __nv_bfloat16,   64, false,  8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d64_full_k16,        __nv_bfloat16,   64, false, 16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d64_full_k16,        __nv_bfloat16,   64, false, 16, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d64_causal_k8,       __half,          64, true,   8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d64_causal_k8,       __half,          64, true,   8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d64_causal_k16,      __half,          64, true,  16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d64_causal_k16,      __half,          64, true,  16, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d64_full_k8,         __half,          64, false,  8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d64_full_k8,         __half,          64, false,  8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d64_full_k16,        __half,          64, false, 16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d64_full_k16,        __half,          64, false, 16, TKW_KIND_LIST)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d128_causal_k8,      __nv_bfloat16,  128, true,   8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d128_causal_k8,      __nv_bfloat16,  128, true,   8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d128_causal_k16,     __nv_bfloat16,  128, true,  16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d128_causal_k16,     __nv_bfloat16,  128, true,  16, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d128_full_k8,        __nv_bfloat16,  128, false,  8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d128_full_k8,        __nv_bfloat16,  128, false,  8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_bf16_d128_full_k16,       __nv_bfloat16,  128, false, 16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_bf16_d128_full_k16,       __nv_bfloat16,  128, false, 16, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d128_causal_k8,      __half,         128, true,   8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d128_causal_k8,      __half,         128, true,   8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d128_causal_k16,     __half,         128, true,  16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d128_causal_k16,     __half,         128, true,  16, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d128_full_k8,        __half,         128, false,  8, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d128_full_k8,        __half,         128, false,  8, TKW_KIND_LIST)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgc_fp16_d128_full_k16,       __half,         128, false, 16, TKW_KIND_CERT)
MOBA_TOPK_WG_LIST_KERNEL(moba_topk_wgr_fp16_d128_full_k16,       __half,         128, false, 16, TKW_KIND_LIST)
#endif
