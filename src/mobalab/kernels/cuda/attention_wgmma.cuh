// MoBA attention forward tile kernel on Hopper warpgroup MMAs (wgmma, sm_90a): the resident variant of
// attention.cuh (one key block of one kv head, up to MOBA_TPC tiles of 64 gathered (query, head, slot) rows
// per CTA, K and V of the block resident in shared memory) for head dim D = 128 and block size B = 64 or 128.
// Same work units, row bookkeeping, scale_log2, mask and partial (o, m, l) format as attn_resident (it calls
// the same setup_rows and write_partials, so the merge and the 16-bit / fp32 partial modules are unchanged);
// only the tile arithmetic differs:
//   S = Q K^T:  one warpgroup (128 threads) computes the whole 64 x B tile, wgmma m64nBk16 over D / 16 = 8
//               k-steps, Q (64 x 128) and K (B x 128) K-major in 128-byte-swizzled shared memory (sw128_offset,
//               wgmma_desc_sw128: the layouts of wgmma.cuh, validated by the probe).
//   softmax:    the S accumulator has the mma.sync m16n8 layout per warp (wgmma_acc_row / wgmma_acc_col), so
//               scale, token-causal / validity mask and (m, l) are the code of subtile_step over all B keys in
//               one step: x = scale_log2 * q.k, masked to -inf, m = max, p = 2^(x - m), l = sum p.
//   O = P V:    P from registers (wgmma_pack_a: accumulator floats 8s .. 8s+7 are the A fragment of keys 16s ..
//               16s+15, rounded to the input type as the mma path does), V as the B operand: V is B keys x 128 d
//               with d contiguous, and keys are the K of this product, so it is MN-major ("transposed"): V is
//               staged exactly like K (sw128_offset(key, d, B)) and read with imm-trans-b = 1 and
//               wgmma_desc_sw128_mn. Two m64n64k16 per k-step (d 0..63 and 64..127) rather than one n128: at
//               N = 64 the descriptor does not depend on which field holds the stride between 64-element
//               blocks of N (see wgmma_desc_sw128_mn); one n128 per k-step is the next step once the probe's
//               N = 128 transposed cases pass.
//
// FLOP / byte, per 64-row tile (B keys, D = 128): 2 * 64 * B * 128 FLOP for S and as many for P V, 4.2 MFLOP at
// B = 128. wgmma reads its shared operands once per warpgroup instead of once per warp: Q 16 KB + K and V
// 2 * B * 256 bytes = 80 KB per tile at B = 128, 52 FLOP per shared byte (the mma.sync kernel's ldmatrix feed:
// 16 FLOP/B per warp, see attention.cuh), so shared-memory bandwidth (128 B/clk/SM against ~4 KFLOP/clk/SM of
// dense bf16 wgmma) no longer bounds the tile; the global traffic per row (Q gather 256 B, partial write 264 B
// and its merge read, K and V shared by up to 256 rows) is the mma kernel's.
// Registers per thread: S B / 2 floats (64 at B = 128), O 64 floats, P B / 16 x 4 (32), plus addressing.
// Shared memory: K and V 2 B 256 bytes, two Q tiles 2 x 16 KB, 1 KB to align the swizzle patterns to 1024 bytes:
// 97 KB at B = 128 (two CTAs per SM), 65 KB at B = 64 (three).
//
// Why one warpgroup and synchronous loads first: it is the smallest change from the validated mma kernel (same
// 128 threads, 64-row tiles, unit layout and launch plan), so a first hardware run tests the layouts, the
// transposed-B operand, the masks and the partials, not a pipeline. The profile of the mma kernel (255 registers,
// one CTA of 4 warps per SM, tensor pipe 27% active, stalled on the mma dependency chain) says the next steps
// are about keeping the tensor pipe fed, in this order:
//   1. a producer warp that loads K / V with TMA (cp.async.bulk.tensor, mbarrier completion) and gathers the Q
//      rows with per-row bulk copies, consumers waiting on mbarriers instead of __syncthreads;
//   2. two consumer warpgroups, each on its own 64-row tile of the same resident K / V (128 rows in flight per
//      CTA), the softmax of one overlapping the other's wgmma (and S of tile i + 1 issued before the softmax of
//      tile i within a warpgroup);
//   3. setmaxnreg: the producer drops to ~40 registers so the consumers get ~232 (S, O and P of one tile plus
//      the next S), which two consumer warpgroups need at B = 128;
//   4. one m64n128k16 per P V k-step once the N = 128 transposed-B probe settles the descriptor's LBO.

#ifndef MOBALAB_ATTENTION_WGMMA_CUH
#define MOBALAB_ATTENTION_WGMMA_CUH

#include "attention.cuh"
#include "wgmma.cuh"

namespace moba {

constexpr int WG_HEAD_DIM = 128;  // the only head dim of the wgmma kernel

// Copy ROWS_T rows of D = 128 two-byte elements (row r from src_row(r), or zeros when src_row gives nullptr) into
// a 128-byte-swizzled K-major tile of ROWS_T rows (sw128_offset: two 64-element column blocks). A zero-filled
// chunk still names a valid address (`any`), as load_kv_tile does.
template <int ROWS_T, typename SrcRow>
__device__ __forceinline__ void wg_load_rows(unsigned tile, const SrcRow& src_row, const char* any, int tid) {
  constexpr int CH = WG_HEAD_DIM / 8;
#pragma unroll 4
  for (int c = tid; c < ROWS_T * CH; c += MOBA_THREADS) {
    const int row = c / CH, ch = c % CH;
    const char* src = src_row(row);
    cp_async16(tile + sw128_offset(row, ch * 8, ROWS_T), src ? src + ch * 16 : any, src ? 16 : 0);
  }
}

template <typename T, int B>
__device__ __forceinline__ void attn_wgmma(const void* q_, const void* k_, const void* v_, const long long* pairs,
                                           const long long* seg_off, const long long* tile_cum, void* part_o,
                                           float* part_ml, int seqlen, int heads, int kv_heads, int top_k,
                                           int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0,
                                           int n_seg, int causal, float scale_log2) {
#if MOBA_HAS_WGMMA
  static_assert(B == 64 || B == 128, "block size");
  constexpr int D = WG_HEAD_DIM;
  constexpr int UNIT = MOBA_ROWS * MOBA_TPC;
  constexpr int NS = B / 2;  // S accumulator floats per thread
  constexpr int NT = B / 8;  // 8-key column groups of S
  constexpr unsigned Q_BYTES = sw128_tile_bytes(MOBA_ROWS, D);
  constexpr unsigned KV_BYTES = sw128_tile_bytes(B, D);
  extern __shared__ unsigned char smem[];
  __shared__ long long s_qoff[UNIT];
  __shared__ long long s_pair[UNIT];
  __shared__ int s_t[UNIT];
  __shared__ int s_mm[2 * UNIT / 32];
  __shared__ int s_seg;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (block_size != B) __trap();  // the launch plan picks the kernel of the block size
  const long long unit = blockIdx.x;
  if (tid == 0) s_seg = unit_segment(tile_cum, n_seg, unit);
  __syncthreads();
  const int seg = s_seg;
  if (seg < 0) return;  // uniform

  const long long first = seg_off[seg] + (unit - tile_cum[seg]) * UNIT;
  const int n_rows = static_cast<int>(min(static_cast<long long>(UNIT), seg_off[seg + 1] - first));
  const int n_tiles = (n_rows + MOBA_ROWS - 1) / MOBA_ROWS;
  const int kvc = seg / n_blocks, j = seg % n_blocks;
  const int kvh = h0 / (heads / kv_heads) + kvc;
  setup_rows<D, UNIT, MOBA_THREADS>(pairs, first, n_rows, top_k, n_q, t0, h0, seqlen, heads, batch_index, s_qoff,
                                    s_pair, s_t, s_mm);
  __syncthreads();

  // Swizzle patterns start 1024-byte aligned (wgmma.cuh); the launch adds 1024 bytes of slack.
  const unsigned sk = (smem_u32(smem) + SW128_PATTERN_BYTES - 1) & ~(SW128_PATTERN_BYTES - 1);
  const unsigned sv = sk + KV_BYTES;
  const unsigned sq = sv + KV_BYTES;
  const long long kv_row_bytes = static_cast<long long>(kv_heads) * D * 2;
  const long long kv_base = ((static_cast<long long>(batch_index) * seqlen) * kv_heads + kvh) * D * 2;
  const char* kb = static_cast<const char*>(k_) + kv_base;
  const char* vb = static_cast<const char*>(v_) + kv_base;
  const int key_begin = j * block_size;
  // The key block, resident; keys beyond seqlen are zero-filled (and masked). V is staged like K: read as the
  // MN-major B operand of P V.
  wg_load_rows<B>(sk, [&](int r) { return key_begin + r < seqlen ? kb + (key_begin + r) * kv_row_bytes : nullptr; },
                  kb, tid);
  wg_load_rows<B>(sv, [&](int r) { return key_begin + r < seqlen ? vb + (key_begin + r) * kv_row_bytes : nullptr; },
                  vb, tid);
  const char* qb = static_cast<const char*>(q_);
  auto q_row = [&](const long long* qoff) {
    return [qoff, qb](int r) { return qoff[r] >= 0 ? qb + qoff[r] * 2 : static_cast<const char*>(nullptr); };
  };
  wg_load_rows<MOBA_ROWS>(sq, q_row(s_qoff), qb, tid);
  cp_async_commit();

  const int g = lane >> 2, tq = lane & 3;
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's accumulator rows (wgmma_acc_row)
  const int block_end = min(key_begin + block_size, seqlen);
  for (int ti = 0; ti < n_tiles; ++ti) {
    if (ti + 1 < n_tiles) {
      wg_load_rows<MOBA_ROWS>(sq + ((ti + 1) & 1) * Q_BYTES, q_row(s_qoff + (ti + 1) * MOBA_ROWS), qb, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async_shared();  // this thread's cp.async data -> visible to wgmma (async proxy) after the barrier
    __syncthreads();
    const unsigned sqt = sq + (ti & 1) * Q_BYTES;
    const int t_min = min(s_mm[4 * ti], s_mm[4 * ti + 2]);
    const int t_max = max(s_mm[4 * ti + 1], s_mm[4 * ti + 3]);
    const int count = min(MOBA_ROWS, n_rows - ti * MOBA_ROWS);
    const int key_end = causal ? min(block_end, t_max + 1) : block_end;
    const int base = ti * MOBA_ROWS;
    const int row_t0 = s_t[base + r0], row_t1 = s_t[base + r1];

    float o[D / 8][4];  // O accumulator of both n64 halves, in write_partials' layout
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {neg_inf(), neg_inf()};
    float l_r[2] = {0.f, 0.f};
    if (key_end > key_begin) {  // uniform
      // S = Q K^T (64 x B), 8 k-steps over D.
      float s[NS];
#pragma unroll
      for (int i = 0; i < NS; ++i) s[i] = 0.f;
      wgmma_fence_operand(s);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        wgmma_ss<T>(s, wgmma_desc_sw128(sqt, ks, MOBA_ROWS), wgmma_desc_sw128(sk, ks, B), ks > 0);
      wgmma_commit_group();
      wgmma_wait_group<0>();
      wgmma_fence_operand(s);

      // Scale to log2 units, then mask (after scaling, as subtile_step: a negative scale cannot make +inf).
      // Float i = 4 nt + e holds key key_begin + 8 nt + 2 tq + (e & 1) of row r0 (e < 2) or r1.
#pragma unroll
      for (int i = 0; i < NS; ++i) s[i] *= scale_log2;
      const bool need_mask = (key_begin + B > seqlen) || (causal && key_begin + B - 1 > t_min);
      if (need_mask) {
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          const int key = key_begin + (i >> 2) * 8 + 2 * tq + (i & 1);
          const int rt = (i & 2) ? row_t1 : row_t0;
          if (!(key < seqlen && (!causal || key <= rt))) s[i] = neg_inf();
        }
      }
      // Softmax over the whole block in one step; l stays a per-thread partial sum (write_partials reduces it
      // over the quad).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = neg_inf();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = (mx == neg_inf()) ? 0.f : mx;
        m_r[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float p0 = exp2f(s[4 * nt + 2 * r] - m_use), p1 = exp2f(s[4 * nt + 2 * r + 1] - m_use);
          s[4 * nt + 2 * r] = p0;
          s[4 * nt + 2 * r + 1] = p1;
          sum += p0 + p1;
        }
        l_r[r] = sum;
      }

      // O = P V: P from registers, V MN-major; d columns 0..63 and 64..127 (V's two 64-element blocks).
      unsigned pa[B / 16][4];
#pragma unroll
      for (int kk = 0; kk < B / 16; ++kk) wgmma_pack_a<T>(s + 8 * kk, pa[kk]);
      float(&o_lo)[32] = *reinterpret_cast<float(*)[32]>(&o[0][0]);
      float(&o_hi)[32] = *reinterpret_cast<float(*)[32]>(&o[D / 16][0]);
      wgmma_fence_operand(o_lo);
      wgmma_fence_operand(o_hi);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < B / 16; ++kk) {
        wgmma_rs<T, 1>(o_lo, pa[kk], wgmma_desc_sw128_mn(sv, kk, B, 64), kk > 0);
        wgmma_rs<T, 1>(o_hi, pa[kk], wgmma_desc_sw128_mn(sv + KV_BYTES / 2, kk, B, 64), kk > 0);
      }
      wgmma_commit_group();
      wgmma_wait_group<0>();
      wgmma_fence_operand(o_lo);
      wgmma_fence_operand(o_hi);
    }
    write_partials<T, PartialElem<T>, D>(o, m_r, l_r, s_pair + base, r0, r1, count,
                                        static_cast<PartialElem<T>*>(part_o), part_ml, lane);
    __syncthreads();  // every wgmma of this tile has read its Q buffer before the buffer is refilled
  }
#else
  __trap();  // wgmma exists on sm_90a only
#endif
}

}  // namespace moba

#endif  // MOBALAB_ATTENTION_WGMMA_CUH
