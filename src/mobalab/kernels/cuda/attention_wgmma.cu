// MoBA attention forward tile kernel on Hopper warpgroup MMAs (see attention_wgmma.cuh for the design; the
// partial format, the merge and the index kernels are attention.cu's):
//   moba_attn_wg_<dtype>_d128_b<B>   dtype in {bf16, f16}, B in {32, 64, 128}: two warpgroups (256 threads), up to
//                                    MOBA_WG_TPC tiles of 64 rows of one key block per CTA, the block resident;
//                                    dynamic shared memory 2 B 256 + 6 x 16384 + 2 x 64 x 272 + 1024 bytes
//   moba_attn_wgws_<dtype>_d128_b<B> the warp-specialised variant, B in {64, 128}
// Same parameter list as attention.cu's tile kernels, so the same launch plan drives it. Built with
// -DMOBA_PARTIAL_FP32=1, part_o is fp32 (the fallback module, same names). sm_90a only (wgmma).
#include "attention_wgmma.cuh"

#define MOBA_ATTN_WG_KERNEL(NAME, T, B)                                                                               \
  extern "C" __global__ void __launch_bounds__(moba::WG_THREADS, 1) NAME(                                                  \
      const void* q, const void* k, const void* v, const long long* pairs, const long long* seg_off,                  \
      const long long* tile_cum, void* part_o, float* part_ml, int seqlen, int heads, int kv_heads, int top_k,        \
      int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0, int n_seg, int causal,                  \
      float scale_log2) {                                                                                             \
    moba::attn_wgmma<T, B>(q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, seqlen, heads, kv_heads, top_k,        \
                           block_size, n_blocks, batch_index, h0, n_q, t0, n_seg, causal, scale_log2);                \
  }

#if MOBA_HAS_HEAD_DIM(128)
MOBA_ATTN_WG_KERNEL(moba_attn_wg_bf16_d128_b32,  __nv_bfloat16, 32)
MOBA_ATTN_WG_KERNEL(moba_attn_wg_bf16_d128_b64,  __nv_bfloat16, 64)
MOBA_ATTN_WG_KERNEL(moba_attn_wg_bf16_d128_b128, __nv_bfloat16, 128)
MOBA_ATTN_WG_KERNEL(moba_attn_wg_f16_d128_b32,   __half,        32)
MOBA_ATTN_WG_KERNEL(moba_attn_wg_f16_d128_b64,   __half,        64)
MOBA_ATTN_WG_KERNEL(moba_attn_wg_f16_d128_b128,  __half,        128)
#endif

// The warp-specialised variant (attn_wgmma_ws): a producer and two consumer warpgroups, persistent over units.
#define MOBA_ATTN_WGWS_KERNEL(NAME, T, B)                                                                             \
  extern "C" __global__ void __launch_bounds__(moba::WS_THREADS, 1) NAME(                                            \
      const void* q, const void* k, const void* v, const long long* pairs, const long long* seg_off,                  \
      const long long* tile_cum, void* part_o, float* part_ml, int seqlen, int heads, int kv_heads, int top_k,        \
      int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0, int n_seg, int causal,                  \
      float scale_log2) {                                                                                             \
    moba::attn_wgmma_ws<T, B>(q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, seqlen, heads, kv_heads, top_k,     \
                              block_size, n_blocks, batch_index, h0, n_q, t0, n_seg, causal, scale_log2);             \
  }

#if MOBA_HAS_HEAD_DIM(128)
MOBA_ATTN_WGWS_KERNEL(moba_attn_wgws_bf16_d128_b64,  __nv_bfloat16, 64)
MOBA_ATTN_WGWS_KERNEL(moba_attn_wgws_bf16_d128_b128, __nv_bfloat16, 128)
MOBA_ATTN_WGWS_KERNEL(moba_attn_wgws_f16_d128_b64,   __half,        64)
MOBA_ATTN_WGWS_KERNEL(moba_attn_wgws_f16_d128_b128,  __half,        128)
#endif
