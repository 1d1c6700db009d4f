// MoBA attention forward entry points (see attention.cuh for the algorithm and the partial format).
//
// Each kind of kernel is defined once, by a MOBA_*_KERNEL macro with a literal parameter list, and
// exported under the names of the instantiation lines below it (mobalab.kernels._launch reads both to check
// launch arguments; the nvcc compile test checks that they give exactly the compiled entry points):
//   moba_attn_fwd_<dtype>_d<D>_kt<KT>   dtype in {bf16, f16}, D in {32, 64, 96, 128, 256}, key sub-tile
//                                       KT in {16, 32, 64}
//   moba_attn_res_<dtype>_d<D>_kt<KT>   resident key block, up to MOBA_TPC tiles per CTA (small blocks)
//   moba_attn_merge_<dtype>_d<D>
//   moba_attn_keys, moba_attn_bounds, moba_attn_segments  (dtype-free index building)
// Tile kernels run kFwdThreads<D> threads: 128, or 256 at D = 256 (attention.cuh). Instantiation lines are
// grouped by head dim under MOBA_HAS_HEAD_DIM (ptx.cuh): -DMOBA_HEAD_DIM=d builds head dim d only.
// part_o (void*) holds the partial o in the input dtype, or in fp32 when built with -DMOBA_PARTIAL_FP32=1
// (moba::PartialElem, attention.cuh): the two formats are two modules with the same kernel names.
#include "attention.cuh"

// BODY: attn_tile (K/V streamed in KT-key sub-tiles) or attn_resident (the whole key block resident).
#define MOBA_FWD_RESIDENT_attn_tile false
#define MOBA_FWD_RESIDENT_attn_resident true
#define MOBA_ATTN_TILE_KERNEL(NAME, BODY, T, D, KT)                                                                   \
  extern "C" __global__ void                                                                                          \
  __launch_bounds__(moba::kFwdThreads<D>, moba::kFwdMinBlocks<D, KT, MOBA_FWD_RESIDENT_##BODY>) NAME(                 \
      const void* q, const void* k, const void* v, const long long* pairs, const long long* seg_off,                  \
      const long long* tile_cum, void* part_o, float* part_ml, int seqlen, int heads, int kv_heads, int top_k,        \
      int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0, int n_seg, int causal,                  \
      float scale_log2) {                                                                                             \
    moba::BODY<T, D, KT>(q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, seqlen, heads, kv_heads, top_k,          \
                         block_size, n_blocks, batch_index, h0, n_q, t0, n_seg, causal, scale_log2);                  \
  }

#if MOBA_HAS_HEAD_DIM(32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d32_kt16,   attn_tile,     __nv_bfloat16,  32, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d32_kt32,   attn_tile,     __nv_bfloat16,  32, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d32_kt64,   attn_tile,     __nv_bfloat16,  32, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d32_kt16,    attn_tile,     __half,         32, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d32_kt32,    attn_tile,     __half,         32, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d32_kt64,    attn_tile,     __half,         32, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d32_kt16,   attn_resident, __nv_bfloat16,  32, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d32_kt32,   attn_resident, __nv_bfloat16,  32, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d32_kt64,   attn_resident, __nv_bfloat16,  32, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d32_kt16,    attn_resident, __half,         32, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d32_kt32,    attn_resident, __half,         32, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d32_kt64,    attn_resident, __half,         32, 64)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d64_kt16,   attn_tile,     __nv_bfloat16,  64, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d64_kt32,   attn_tile,     __nv_bfloat16,  64, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d64_kt64,   attn_tile,     __nv_bfloat16,  64, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d64_kt16,    attn_tile,     __half,         64, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d64_kt32,    attn_tile,     __half,         64, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d64_kt64,    attn_tile,     __half,         64, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d64_kt16,   attn_resident, __nv_bfloat16,  64, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d64_kt32,   attn_resident, __nv_bfloat16,  64, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d64_kt64,   attn_resident, __nv_bfloat16,  64, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d64_kt16,    attn_resident, __half,         64, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d64_kt32,    attn_resident, __half,         64, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d64_kt64,    attn_resident, __half,         64, 64)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d96_kt16,   attn_tile,     __nv_bfloat16,  96, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d96_kt32,   attn_tile,     __nv_bfloat16,  96, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d96_kt64,   attn_tile,     __nv_bfloat16,  96, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d96_kt16,    attn_tile,     __half,         96, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d96_kt32,    attn_tile,     __half,         96, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d96_kt64,    attn_tile,     __half,         96, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d96_kt16,   attn_resident, __nv_bfloat16,  96, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d96_kt32,   attn_resident, __nv_bfloat16,  96, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d96_kt64,   attn_resident, __nv_bfloat16,  96, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d96_kt16,    attn_resident, __half,         96, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d96_kt32,    attn_resident, __half,         96, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d96_kt64,    attn_resident, __half,         96, 64)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d128_kt16,  attn_tile,     __nv_bfloat16, 128, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d128_kt32,  attn_tile,     __nv_bfloat16, 128, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d128_kt64,  attn_tile,     __nv_bfloat16, 128, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d128_kt16,   attn_tile,     __half,        128, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d128_kt32,   attn_tile,     __half,        128, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d128_kt64,   attn_tile,     __half,        128, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d128_kt16,  attn_resident, __nv_bfloat16, 128, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d128_kt32,  attn_resident, __nv_bfloat16, 128, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d128_kt64,  attn_resident, __nv_bfloat16, 128, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d128_kt16,   attn_resident, __half,        128, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d128_kt32,   attn_resident, __half,        128, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d128_kt64,   attn_resident, __half,        128, 64)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d256_kt16,  attn_tile,     __nv_bfloat16, 256, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d256_kt32,  attn_tile,     __nv_bfloat16, 256, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_bf16_d256_kt64,  attn_tile,     __nv_bfloat16, 256, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d256_kt16,   attn_tile,     __half,        256, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d256_kt32,   attn_tile,     __half,        256, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_fwd_f16_d256_kt64,   attn_tile,     __half,        256, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d256_kt16,  attn_resident, __nv_bfloat16, 256, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d256_kt32,  attn_resident, __nv_bfloat16, 256, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_bf16_d256_kt64,  attn_resident, __nv_bfloat16, 256, 64)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d256_kt16,   attn_resident, __half,        256, 16)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d256_kt32,   attn_resident, __half,        256, 32)
MOBA_ATTN_TILE_KERNEL(moba_attn_res_f16_d256_kt64,   attn_resident, __half,        256, 64)
#endif

#define MOBA_ATTN_MERGE_KERNEL(NAME, T, D)                                                                            \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                                             \
      const void* part_o, const float* part_ml, const int* topk, void* out, float* lse, int seqlen, int heads,        \
      int top_k, int n_blocks, int batch_index, int h0, int n_heads_c, int t0, int n_q, int write_lse,                \
      int out_mode) {                                                                                                 \
    moba::merge_rows<T, moba::PartialElem<T>, D>(static_cast<const moba::PartialElem<T>*>(part_o), part_ml, topk, out, \
                                                 lse, seqlen, heads, top_k, n_blocks, batch_index, h0, n_heads_c, t0, \
                                                 n_q, write_lse, out_mode);                                           \
  }

#if MOBA_HAS_HEAD_DIM(32)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_bf16_d32,  __nv_bfloat16, 32)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_f16_d32,   __half,        32)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_bf16_d64,  __nv_bfloat16, 64)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_f16_d64,   __half,        64)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_bf16_d96,  __nv_bfloat16, 96)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_f16_d96,   __half,        96)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_bf16_d128, __nv_bfloat16, 128)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_f16_d128,  __half,        128)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_bf16_d256, __nv_bfloat16, 256)
MOBA_ATTN_MERGE_KERNEL(moba_attn_merge_f16_d256,  __half,        256)
#endif

extern "C" __global__ void moba_attn_keys(const int* topk, int* keys, int seqlen, int heads, int top_k,
                                          int n_blocks, int batch_index, int h0, int n_heads_c, int t0, int n_q,
                                          int group) {
  moba::chunk_keys(topk, keys, seqlen, heads, top_k, n_blocks, batch_index, h0, n_heads_c, t0, n_q, group);
}

extern "C" __global__ void moba_attn_bounds(const int* sorted_keys, long long n_pairs, int n_seg,
                                            long long* seg_off) {
  moba::chunk_bounds(sorted_keys, n_pairs, n_seg, seg_off);
}

extern "C" __global__ void __launch_bounds__(512) moba_attn_segments(const long long* seg_off, int n_seg,
                                                                     int rows_per_unit, long long* tile_cum) {
  moba::chunk_segments(seg_off, n_seg, rows_per_unit, tile_cum);
}
