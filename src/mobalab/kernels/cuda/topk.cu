// MoBA routing stage 2, mma.sync kernels: the entry points of topk_body (router variant "mma") and
// topk_split_body (variant "split", opt-in: register-list tiers at head dims up to 128), both in
// topk.cuh, which holds the design notes, the score tile and the row lists shared with the wgmma kernels of
// topk_wgmma.cu.
#include "topk.cuh"

// ---- entry points: dtype x head dim x causal x list tier (k8 / k16: register lists for up to 8 / 16
// listed blocks, k64: heap in shared memory). One definition with a literal parameter list, exported under
// the names of the instantiation lines (mobalab.kernels._launch reads both to check launch arguments),
// grouped by head dim under MOBA_HAS_HEAD_DIM (ptx.cuh: -DMOBA_HEAD_DIM=d builds head dim d only). ----

#define MOBA_TOPK_KERNEL(NAME, T, D, CAUSAL, LCAP)                                                                    \
    extern "C" __global__ void __launch_bounds__(TK_THREADS, kTopkMinCtas<D, LCAP>)                                  \
    NAME(const T* __restrict__ q, const T* __restrict__ chi, const T* __restrict__ clo, int* __restrict__ out,        \
         int seqlen, int heads, int kv_heads, int block_size, int n_blocks, int top_k, int q_pos0,                    \
         int fold_blocks) {                                                                                           \
        topk_body<T, D, CAUSAL, LCAP>(q, chi, clo, out, seqlen, heads, kv_heads, block_size, n_blocks, top_k,        \
                                      q_pos0, fold_blocks);                                                           \
    }

// The split router (topk_split_body): register-list tiers only; two CTAs of 8 warps per SM (<= 128 registers),
// one at D = 256, where a CTA takes 161 KB of shared memory.
#define MOBA_TOPK_SPLIT_KERNEL(NAME, T, D, CAUSAL, LCAP)                                                              \
    extern "C" __global__ void __launch_bounds__(TK_SPLIT_THREADS, kTopkSplitMinCtas<D>)                          \
    NAME(const T* __restrict__ q, const T* __restrict__ chi, const T* __restrict__ clo, int* __restrict__ out,        \
         int seqlen, int heads, int kv_heads, int block_size, int n_blocks, int top_k, int q_pos0,                    \
         int fold_blocks) {                                                                                           \
        topk_split_body<T, D, CAUSAL, LCAP>(q, chi, clo, out, seqlen, heads, kv_heads, block_size, n_blocks, top_k,  \
                                            q_pos0, fold_blocks);                                                     \
    }

#if MOBA_HAS_HEAD_DIM(32)
MOBA_TOPK_KERNEL(moba_topk_bf16_d32_causal_k8,    __nv_bfloat16, 32,  true,   8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d32_causal_k16,   __nv_bfloat16, 32,  true,  16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d32_causal_k64,   __nv_bfloat16, 32,  true,   0)
MOBA_TOPK_KERNEL(moba_topk_bf16_d32_full_k8,      __nv_bfloat16, 32,  false,  8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d32_full_k16,     __nv_bfloat16, 32,  false, 16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d32_full_k64,     __nv_bfloat16, 32,  false,  0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d32_causal_k8,    __half,        32,  true,   8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d32_causal_k16,   __half,        32,  true,  16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d32_causal_k64,   __half,        32,  true,   0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d32_full_k8,      __half,        32,  false,  8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d32_full_k16,     __half,        32,  false, 16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d32_full_k64,     __half,        32,  false,  0)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d32_causal_k8_split,      __nv_bfloat16, 32,  true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d32_causal_k16_split,     __nv_bfloat16, 32,  true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d32_full_k8_split,        __nv_bfloat16, 32,  false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d32_full_k16_split,       __nv_bfloat16, 32,  false, 16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d32_causal_k8_split,      __half,        32,  true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d32_causal_k16_split,     __half,        32,  true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d32_full_k8_split,        __half,        32,  false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d32_full_k16_split,       __half,        32,  false, 16)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_TOPK_KERNEL(moba_topk_bf16_d64_causal_k8,    __nv_bfloat16, 64,  true,   8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d64_causal_k16,   __nv_bfloat16, 64,  true,  16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d64_causal_k64,   __nv_bfloat16, 64,  true,   0)
MOBA_TOPK_KERNEL(moba_topk_bf16_d64_full_k8,      __nv_bfloat16, 64,  false,  8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d64_full_k16,     __nv_bfloat16, 64,  false, 16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d64_full_k64,     __nv_bfloat16, 64,  false,  0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d64_causal_k8,    __half,        64,  true,   8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d64_causal_k16,   __half,        64,  true,  16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d64_causal_k64,   __half,        64,  true,   0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d64_full_k8,      __half,        64,  false,  8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d64_full_k16,     __half,        64,  false, 16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d64_full_k64,     __half,        64,  false,  0)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d64_causal_k8_split,      __nv_bfloat16, 64,  true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d64_causal_k16_split,     __nv_bfloat16, 64,  true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d64_full_k8_split,        __nv_bfloat16, 64,  false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d64_full_k16_split,       __nv_bfloat16, 64,  false, 16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d64_causal_k8_split,      __half,        64,  true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d64_causal_k16_split,     __half,        64,  true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d64_full_k8_split,        __half,        64,  false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d64_full_k16_split,       __half,        64,  false, 16)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_TOPK_KERNEL(moba_topk_bf16_d96_causal_k8,    __nv_bfloat16, 96,  true,   8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d96_causal_k16,   __nv_bfloat16, 96,  true,  16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d96_causal_k64,   __nv_bfloat16, 96,  true,   0)
MOBA_TOPK_KERNEL(moba_topk_bf16_d96_full_k8,      __nv_bfloat16, 96,  false,  8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d96_full_k16,     __nv_bfloat16, 96,  false, 16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d96_full_k64,     __nv_bfloat16, 96,  false,  0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d96_causal_k8,    __half,        96,  true,   8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d96_causal_k16,   __half,        96,  true,  16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d96_causal_k64,   __half,        96,  true,   0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d96_full_k8,      __half,        96,  false,  8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d96_full_k16,     __half,        96,  false, 16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d96_full_k64,     __half,        96,  false,  0)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d96_causal_k8_split,      __nv_bfloat16, 96,  true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d96_causal_k16_split,     __nv_bfloat16, 96,  true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d96_full_k8_split,        __nv_bfloat16, 96,  false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d96_full_k16_split,       __nv_bfloat16, 96,  false, 16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d96_causal_k8_split,      __half,        96,  true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d96_causal_k16_split,     __half,        96,  true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d96_full_k8_split,        __half,        96,  false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d96_full_k16_split,       __half,        96,  false, 16)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_TOPK_KERNEL(moba_topk_bf16_d128_causal_k8,   __nv_bfloat16, 128, true,   8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d128_causal_k16,  __nv_bfloat16, 128, true,  16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d128_causal_k64,  __nv_bfloat16, 128, true,   0)
MOBA_TOPK_KERNEL(moba_topk_bf16_d128_full_k8,     __nv_bfloat16, 128, false,  8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d128_full_k16,    __nv_bfloat16, 128, false, 16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d128_full_k64,    __nv_bfloat16, 128, false,  0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d128_causal_k8,   __half,        128, true,   8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d128_causal_k16,  __half,        128, true,  16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d128_causal_k64,  __half,        128, true,   0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d128_full_k8,     __half,        128, false,  8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d128_full_k16,    __half,        128, false, 16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d128_full_k64,    __half,        128, false,  0)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d128_causal_k8_split,     __nv_bfloat16, 128, true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d128_causal_k16_split,    __nv_bfloat16, 128, true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d128_full_k8_split,       __nv_bfloat16, 128, false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d128_full_k16_split,      __nv_bfloat16, 128, false, 16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d128_causal_k8_split,     __half,        128, true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d128_causal_k16_split,    __half,        128, true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d128_full_k8_split,       __half,        128, false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d128_full_k16_split,      __half,        128, false, 16)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_TOPK_KERNEL(moba_topk_bf16_d256_causal_k8,   __nv_bfloat16, 256, true,   8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d256_causal_k16,  __nv_bfloat16, 256, true,  16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d256_causal_k64,  __nv_bfloat16, 256, true,   0)
MOBA_TOPK_KERNEL(moba_topk_bf16_d256_full_k8,     __nv_bfloat16, 256, false,  8)
MOBA_TOPK_KERNEL(moba_topk_bf16_d256_full_k16,    __nv_bfloat16, 256, false, 16)
MOBA_TOPK_KERNEL(moba_topk_bf16_d256_full_k64,    __nv_bfloat16, 256, false,  0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d256_causal_k8,   __half,        256, true,   8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d256_causal_k16,  __half,        256, true,  16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d256_causal_k64,  __half,        256, true,   0)
MOBA_TOPK_KERNEL(moba_topk_fp16_d256_full_k8,     __half,        256, false,  8)
MOBA_TOPK_KERNEL(moba_topk_fp16_d256_full_k16,    __half,        256, false, 16)
MOBA_TOPK_KERNEL(moba_topk_fp16_d256_full_k64,    __half,        256, false,  0)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d256_causal_k8_split,     __nv_bfloat16, 256, true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d256_causal_k16_split,    __nv_bfloat16, 256, true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d256_full_k8_split,       __nv_bfloat16, 256, false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_bf16_d256_full_k16_split,      __nv_bfloat16, 256, false, 16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d256_causal_k8_split,     __half,        256, true,   8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d256_causal_k16_split,    __half,        256, true,  16)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d256_full_k8_split,       __half,        256, false,  8)
MOBA_TOPK_SPLIT_KERNEL(moba_topk_fp16_d256_full_k16_split,      __half,        256, false, 16)
#endif
