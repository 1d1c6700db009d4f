// MoBA attention backward entry points (see attention_bwd.cuh for the algorithm).
//
// Each kind of kernel is defined once, by a MOBA_BWD_*_KERNEL macro with a literal parameter list, and
// exported under the names of the instantiation lines below it (mobalab.kernels._launch reads both to check
// launch arguments). Variants, dtype in {bf16, f16}, D in {32, 64, 96, 128, 256}:
//   moba_bwd_delta_<dtype>_d<D>      D = rowsum(dO o O) - dlse, fp32 (and, when given, the dQ accumulator,
//                                    fp32 or 16-bit, zeroed and the rows' (lse log2(e), D) head-major for the
//                                    records)
//   moba_bwd_<dtype>_d<D>            dK, dV (and dQ contributions) per 64-key sub-tile of a key block;
//                                    kBwdThreads<D> threads: 128, or 256 at D = 256 (attention_bwd.cuh)
//   moba_bwd_blk_<dtype>_d<D>        the same per 128 keys, 8 warps, D in {64, 128} (attention_bwd_block.cuh)
//   moba_bwd_dq_merge_<dtype>_d<D>   deterministic dQ: per-slot partials summed in slot order
//   moba_bwd_rows                    per-row records (lse2, D, t, head) of a chunk's sorted list (the "tile" and
//                                    "block" kernels'; the wgmma kernel builds its own), from the
//                                    delta kernel's head-major (lse2, D)
// The index building (keys, sort, segment bounds) is the forward's. Instantiation lines are grouped by head
// dim under MOBA_HAS_HEAD_DIM (ptx.cuh): -DMOBA_HEAD_DIM=d builds head dim d only.
#include "attention_bwd.cuh"
#include "attention_bwd_block.cuh"

#define MOBA_BWD_DELTA_KERNEL(NAME, T, D)                                                                             \
  extern "C" __global__ void __launch_bounds__(256) NAME(const void* out, const void* dout, float* delta,             \
                                                         void* zero_rows, int zero_bytes, long long n_rows,            \
                                                         const float* lse, const float* dlse, void* stats, int seqlen, \
                                                         int heads, int tokens) {                                     \
    moba_bwd::delta_rows<T, D>(out, dout, delta, zero_rows, zero_bytes, n_rows, lse, dlse,                            \
                               static_cast<moba_bwd::RowStat*>(stats), seqlen, heads, tokens);                        \
  }

#if MOBA_HAS_HEAD_DIM(32)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_bf16_d32,  __nv_bfloat16, 32)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_f16_d32,   __half,        32)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_bf16_d64,  __nv_bfloat16, 64)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_f16_d64,   __half,        64)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_bf16_d96,  __nv_bfloat16, 96)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_f16_d96,   __half,        96)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_bf16_d128, __nv_bfloat16, 128)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_f16_d128,  __half,        128)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_bf16_d256, __nv_bfloat16, 256)
MOBA_BWD_DELTA_KERNEL(moba_bwd_delta_f16_d256,  __half,        256)
#endif

#if MOBA_HAS_HEAD_DIM(32)
MOBA_BWD_KERNEL(moba_bwd_bf16_d32,  bwd_tile, (moba_bwd::kBwdThreads<32>), __nv_bfloat16, 32)
MOBA_BWD_KERNEL(moba_bwd_f16_d32,   bwd_tile, (moba_bwd::kBwdThreads<32>), __half,        32)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_BWD_KERNEL(moba_bwd_bf16_d64,  bwd_tile, (moba_bwd::kBwdThreads<64>), __nv_bfloat16, 64)
MOBA_BWD_KERNEL(moba_bwd_f16_d64,   bwd_tile, (moba_bwd::kBwdThreads<64>), __half,        64)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_BWD_KERNEL(moba_bwd_bf16_d96,  bwd_tile, (moba_bwd::kBwdThreads<96>), __nv_bfloat16, 96)
MOBA_BWD_KERNEL(moba_bwd_f16_d96,   bwd_tile, (moba_bwd::kBwdThreads<96>), __half,        96)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_BWD_KERNEL(moba_bwd_bf16_d128, bwd_tile, (moba_bwd::kBwdThreads<128>), __nv_bfloat16, 128)
MOBA_BWD_KERNEL(moba_bwd_f16_d128,  bwd_tile, (moba_bwd::kBwdThreads<128>), __half,        128)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_BWD_KERNEL(moba_bwd_bf16_d256, bwd_tile, (moba_bwd::kBwdThreads<256>), __nv_bfloat16, 256)
MOBA_BWD_KERNEL(moba_bwd_f16_d256,  bwd_tile, (moba_bwd::kBwdThreads<256>), __half,        256)
#endif

#if MOBA_HAS_HEAD_DIM(64)
MOBA_BWD_KERNEL(moba_bwd_blk_bf16_d64,  bwd_block, (MOBA_BWD_BLOCK_THREADS), __nv_bfloat16, 64)
MOBA_BWD_KERNEL(moba_bwd_blk_f16_d64,   bwd_block, (MOBA_BWD_BLOCK_THREADS), __half,        64)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_BWD_KERNEL(moba_bwd_blk_bf16_d128, bwd_block, (MOBA_BWD_BLOCK_THREADS), __nv_bfloat16, 128)
MOBA_BWD_KERNEL(moba_bwd_blk_f16_d128,  bwd_block, (MOBA_BWD_BLOCK_THREADS), __half,        128)
#endif

#define MOBA_BWD_DQ_MERGE_KERNEL(NAME, T, D)                                                                          \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                                             \
      const float* part_dq, const int* topk, void* dq, int seqlen, int heads, int top_k, int n_blocks,                \
      int batch_index, int h0, int n_heads_c, int t0, int n_q) {                                                      \
    moba_bwd::dq_merge<T, D>(part_dq, topk, dq, seqlen, heads, top_k, n_blocks, batch_index, h0, n_heads_c, t0,       \
                             n_q);                                                                                    \
  }

#if MOBA_HAS_HEAD_DIM(32)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_bf16_d32,  __nv_bfloat16, 32)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_f16_d32,   __half,        32)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_bf16_d64,  __nv_bfloat16, 64)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_f16_d64,   __half,        64)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_bf16_d96,  __nv_bfloat16, 96)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_f16_d96,   __half,        96)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_bf16_d128, __nv_bfloat16, 128)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_f16_d128,  __half,        128)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_bf16_d256, __nv_bfloat16, 256)
MOBA_BWD_DQ_MERGE_KERNEL(moba_bwd_dq_merge_f16_d256,  __half,        256)
#endif

extern "C" __global__ void __launch_bounds__(256) moba_bwd_rows(
    const long long* pairs, const long long* seg_off, const void* stats, void* rows,
    long long n_pairs, int n_seg, int seqlen, int heads, int top_k, int batch_index, int h0, int n_q, int t0) {
  moba_bwd::build_rows(pairs, seg_off, static_cast<const moba_bwd::RowStat*>(stats),
                       static_cast<moba_bwd::RowInfo*>(rows), n_pairs, n_seg, seqlen, heads, top_k, batch_index, h0,
                       n_q, t0);
}
