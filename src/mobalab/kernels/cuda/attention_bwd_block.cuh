// MoBA attention backward, variant "block": one CTA of 8 warps per 128 keys of a key block (the whole block at
// B = 128), the warp tiles of every product decoupled from the ownership of dK and dV. Same equations, row
// records, gather, dQ modes and dK / dV modes as attention_bwd.cuh's bwd_tile (read that first); per tile of 64
// gathered rows, with warp w = 4 rw + kw:
//   1. S^T = K Q^T and dP^T = V dO^T, warp tile 32 keys (kw) x 32 rows (rw); P and dS in registers; P^T and
//      dS^T to shared memory (128 keys x 64 rows each, bf16/fp16).
//   2. dV += P^T dO and dK += dS^T Q, warp tile 32 keys (kw) x D/2 columns (rw): A from shared memory.
//   3. dQ = scale * dS K, warp tile 32 rows (w & 1) x D/4 columns (w >> 1), summed over the 128 keys.
// Against bwd_tile (each warp 16 keys of dK / dV and an S^T tile tied to them; 64 keys per CTA), per warp and
// tile: MMAs per ldmatrix go from ~1.5 to ~2.2 (a 32 x 32 tile loads 4 fragments for 8 MMAs), and the gather,
// row records, dQ pass and its atomics run once per 128 keys instead of twice. This is the tiling of FlashMoBA's
// backward, which issued 3.8 instructions per MMA against bwd_tile's 6.0 (docs/design.md, "Backward").
// FLOPs per tile (64 rows x 128 keys, D = 128): 5 products x 2 x 64 x 128 x 128 = 10.5 MFLOP; bytes moved into
// shared memory per tile: the Q and dO rows, 2 x 64 x 256 = 32 KB (K, V once per CTA), so 320 FLOP per byte.
// Shared memory: K, V 128 x D each, 2 x Q, 2 x dO 64 x D each, P^T and dS^T 128 x 64 each, 3 x 64 row records:
// 163 KB at D = 128 (one CTA of 8 warps per SM), 99 KB at D = 64. Head dims 64 and 128 (column splits of D / 2
// and D / 4 into whole pairs of 8-column n-tiles).

#ifndef MOBALAB_ATTENTION_BWD_BLOCK_CUH
#define MOBALAB_ATTENTION_BWD_BLOCK_CUH

#include "attention_bwd.cuh"

#define MOBA_BWD_BLOCK_KEYS 128    // keys per CTA
#define MOBA_BWD_BLOCK_THREADS 256  // 8 warps
// Unrolling of the dQ loop (phase 3; its 8 MMAs per step wait on the step's ldmatrix, where phases 1 and 2 have
// 16 and 32 MMAs to cover them): 2 lets ptxas load the next step's fragments under this step's MMAs (255
// registers, no spills at D = 128; the whole backward 1.8% faster at 64K on an H200, within 0.5% at 8K and 16K).
// By default 2 at D = 128 and 1 at D = 64 (not measured there); -DMOBA_BWD_DQ_UNROLL=n sets it for both.
// Phase 2 unrolled by 2 spills.
#ifdef MOBA_BWD_DQ_UNROLL
#define MOBA_BWD_DQ_UNROLL_FOR(D) (MOBA_BWD_DQ_UNROLL)
#else
#define MOBA_BWD_DQ_UNROLL_FOR(D) ((D) == 128 ? 2 : 1)
#endif

namespace moba_bwd {

template <typename T, int D>
__device__ __forceinline__ void bwd_block(const void* q_, const void* k_, const void* v_, const void* dout_,
                                          const RowInfo* rows, const long long* pairs, const long long* seg_off,
                                          const int* seg_order, float* dq_acc, float* part_dq, void* dk_, void* dv_,
                                          float* dk_acc, float* dv_acc, int seqlen, int heads, int kv_heads, int block_size,
                                          int n_blocks, int batch_index, int h0, int n_seg, int causal, float scale,
                                          float scale_log2, int sub0, int n_sub_launch, int dq_mode, int dkv_mode) {
  static_assert(D == 64 || D == 128, "the block backward has head dims 64 and 128");
  constexpr int NTHREADS = MOBA_BWD_BLOCK_THREADS;
  constexpr int KEYS = MOBA_BWD_BLOCK_KEYS;
  constexpr int ROWS = MOBA_BWD_ROWS;
  constexpr int NTV = D / 16;  // n-tiles (8 columns) of dK / dV per warp: D / 2 columns
  constexpr int NTQ = D / 32;  // n-tiles of dQ per warp: D / 4 columns
  constexpr unsigned KV_BYTES = KEYS * D * 2;
  constexpr unsigned TILE_BYTES = ROWS * D * 2;
  constexpr unsigned T64_BYTES = KEYS * ROWS * 2;  // P^T or dS^T: 128 keys x 64 rows
  constexpr int DQ_UNROLL = MOBA_BWD_DQ_UNROLL_FOR(D);
  MOBA_DYNAMIC_SMEM(smem);
  const unsigned sK = smem_u32(smem);
  const unsigned sV = sK + KV_BYTES;
  const unsigned sQ = sV + KV_BYTES;          // 2 buffers
  const unsigned sdO = sQ + 2 * TILE_BYTES;   // 2 buffers
  const unsigned sPt = sdO + 2 * TILE_BYTES;  // P^T, rows = keys, swizzled as D = 64
  const unsigned sdS = sPt + T64_BYTES;       // dS^T
  unsigned char* info_base = smem + 2 * KV_BYTES + 4 * TILE_BYTES + 2 * T64_BYTES;  // 3 x 64 RowInfo
  const RowInfo* sInfo = reinterpret_cast<const RowInfo*>(info_base);
  const unsigned sInfoU = smem_u32(info_base);
  __shared__ long long s_pair[ROWS];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int kw = warp & 3, rw = warp >> 2;  // phases 1 and 2: keys 32 kw .., rows (1) / columns (2) by rw
  const CtaWork w = cta_work<KEYS>(seg_off, seg_order, seqlen, heads, kv_heads, block_size, n_blocks, batch_index,
                                   h0, n_seg, sub0, n_sub_launch);
  if (!w.ok) return;
  const int kvh = w.kvh, key0 = w.key0, key_end = w.key_end;
  const long long row_base = w.row_base;

  const char* qb = static_cast<const char*>(q_);
  const char* gb = static_cast<const char*>(dout_);
  start_segment<D, KEYS, NTHREADS>(sK, sV, sQ, sdO, sInfoU, sInfo, k_, v_, qb, gb, rows, w, heads, h0, kv_heads, tid);

  float dk[2][NTV][4], dv[2][NTV][4];  // keys 32 kw + 16 mt + (g, g + 8), columns rw D/2 + 8 nt + (2 tq, +1)
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mt][nt][e] = dv[mt][nt][e] = 0.f;

  // this thread's key rows in phases 1 and 2: key_a + 16 mt + 8 h (registers are short: computed where used)
  const int key_a = key0 + kw * 32 + g;

  for (int ti = 0; ti < w.n_tiles; ++ti) {
    const int count = begin_tile<D, NTHREADS>(sQ, sdO, sInfoU, sInfo, qb, gb, rows, w, ti, heads, h0, pairs, s_pair,
                                              dq_mode, tid);
    const RowInfo* info = sInfo + (ti % 3) * ROWS;
    const unsigned sq = sQ + (ti & 1) * TILE_BYTES;
    const unsigned sdo = sdO + (ti & 1) * TILE_BYTES;

    // ---- 1. S^T and dP^T: 32 keys (2 m-tiles) x 32 rows (4 n-tiles) per warp
    {
      float s[2][4][4], dp[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
#pragma unroll 1  // unrolled by 2, the D = 128 kernel spills
      for (int ks = 0; ks < D / 16; ++ks) {
        unsigned ka[2][4], va[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int arow = kw * 32 + mt * 16 + (lane & 15), ach = ks * 2 + (lane >> 4);
          ldmatrix_x4(sK + swz<D>(arow, ach), ka[mt][0], ka[mt][1], ka[mt][2], ka[mt][3]);
          ldmatrix_x4(sV + swz<D>(arow, ach), va[mt][0], va[mt][1], va[mt][2], va[mt][3]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // B: rows 32 rw + 16 h .. + 15 as [n = row][k = d]: matrices (n-tile, k half)
          const int brow = rw * 32 + h * 16 + ((lane >> 4) << 3) + (lane & 7), bch = ks * 2 + ((lane >> 3) & 1);
          unsigned qb0, qb1, qb2, qb3, gb0, gb1, gb2, gb3;
          ldmatrix_x4(sq + swz<D>(brow, bch), qb0, qb1, qb2, qb3);
          ldmatrix_x4(sdo + swz<D>(brow, bch), gb0, gb1, gb2, gb3);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Elem<T>::mma(s[mt][2 * h], ka[mt], qb0, qb1);
            Elem<T>::mma(s[mt][2 * h + 1], ka[mt], qb2, qb3);
            Elem<T>::mma(dp[mt][2 * h], va[mt], gb0, gb1);
            Elem<T>::mma(dp[mt][2 * h + 1], va[mt], gb2, gb3);
          }
        }
      }
      // P and dS at (key row 32 kw + 16 mt + g (+8 for e >= 2), gathered row 32 rw + 8 nt + 2 tq + (e & 1)),
      // branch-free (bwd_tile's comments); P^T and dS^T to shared memory as packed pairs of adjacent rows
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          const int r = rw * 32 + nt * 8 + 2 * tq + par;
          const RowInfo ri = info[r];
          // the row's last visible key, relative to key_a: one compare per element against a constant
          const int last = r < count ? (causal ? min(ri.t, key_end - 1) : key_end - 1) - key_a : -1;
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int e = 2 * h + par;
              const float x = s[mt][nt][e] * scale_log2 - ri.lse2;  // finite: a select, not an add, masks it
              const float p = exp2f(mt * 16 + h * 8 <= last ? x : __int_as_float(0xff800000u));
              s[mt][nt][e] = p;
              dp[mt][nt][e] = p * (dp[mt][nt][e] - ri.delta);
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int kr = kw * 32 + mt * 16 + g, chunk = rw * 4 + nt;
          st_shared_b32(sPt + 4 * tq + swz<64>(kr, chunk), Elem<T>::pack(s[mt][nt][0], s[mt][nt][1]));
          st_shared_b32(sPt + 4 * tq + swz<64>(kr + 8, chunk), Elem<T>::pack(s[mt][nt][2], s[mt][nt][3]));
          st_shared_b32(sdS + 4 * tq + swz<64>(kr, chunk), Elem<T>::pack(dp[mt][nt][0], dp[mt][nt][1]));
          st_shared_b32(sdS + 4 * tq + swz<64>(kr + 8, chunk), Elem<T>::pack(dp[mt][nt][2], dp[mt][nt][3]));
        }
      }
    }
    __syncthreads();  // P^T, dS^T complete

    // ---- 2. dV += P^T dO, dK += dS^T Q: 32 keys (kw) x D/2 columns (rw) per warp, over the tile's 64 rows
#pragma unroll 1
    for (int kk = 0; kk < ROWS / 16; ++kk) {
      unsigned pa[2][4], da[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int arow = kw * 32 + mt * 16 + (lane & 15), ach = kk * 2 + (lane >> 4);
        ldmatrix_x4(sPt + swz<64>(arow, ach), pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3]);
        ldmatrix_x4(sdS + swz<64>(arow, ach), da[mt][0], da[mt][1], da[mt][2], da[mt][3]);
      }
#pragma unroll
      for (int dpair = 0; dpair < NTV / 2; ++dpair) {
        const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = (rw * (NTV / 2) + dpair) * 2 + (lane >> 4);
        unsigned b0, b1, b2, b3;
        ldmatrix_x4_trans(sdo + swz<D>(row, ch), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Elem<T>::mma(dv[mt][2 * dpair], pa[mt], b0, b1);
          Elem<T>::mma(dv[mt][2 * dpair + 1], pa[mt], b2, b3);
        }
        ldmatrix_x4_trans(sq + swz<D>(row, ch), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Elem<T>::mma(dk[mt][2 * dpair], da[mt], b0, b1);
          Elem<T>::mma(dk[mt][2 * dpair + 1], da[mt], b2, b3);
        }
      }
    }

    // ---- 3. dQ = scale * dS K: 32 rows (warp & 1) x D/4 columns (warp >> 1) per warp, over the 128 keys
    {
      const int qr = warp & 1, qc = warp >> 1;
      float acc[2][NTQ][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTQ; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
#pragma unroll DQ_UNROLL  // a constant, not the macro: pragmas do not expand macros
      for (int kk = 0; kk < KEYS / 16; ++kk) {
        unsigned a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          // A = dS (m = gathered row, k = key) from dS^T storage: matrix j = (m half j&1, k half j>>1)
          const int mj = lane >> 3;
          const int arow = kk * 16 + (mj >> 1) * 8 + (lane & 7), ach = (qr * 32 + mt * 16) / 8 + (mj & 1);
          ldmatrix_x4_trans(sdS + swz<64>(arow, ach), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
        }
#pragma unroll
        for (int dpair = 0; dpair < NTQ / 2; ++dpair) {
          const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int ch = (qc * (NTQ / 2) + dpair) * 2 + (lane >> 4);
          unsigned b0, b1, b2, b3;
          ldmatrix_x4_trans(sK + swz<D>(row, ch), b0, b1, b2, b3);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Elem<T>::mma(acc[mt][2 * dpair], a[mt], b0, b1);
            Elem<T>::mma(acc[mt][2 * dpair + 1], a[mt], b2, b3);
          }
        }
      }
      float* dq_base = dq_mode == 0 ? dq_acc : part_dq;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r0 = qr * 32 + mt * 16 + g, r1 = r0 + 8;
        const bool has0 = r0 < count, has1 = r1 < count;
        const int col0 = qc * (D / 4) + 2 * tq;
        add_dq<NTQ>(dq_base + dq_row_offset<D>(info, s_pair, r0, has0, row_base, heads, h0, dq_mode) + col0,
                    dq_base + dq_row_offset<D>(info, s_pair, r1, has1, row_base, heads, h0, dq_mode) + col0, has0,
                    has1, acc[mt], scale, dq_mode);
      }
    }
    // the next iteration's wait + barrier orders these reads before P^T, dS^T and the buffers are rewritten
  }
  cp_async_wait<0>();

  // dK (scaled) and dV: keys 32 kw + 16 mt + g (+ 8), columns rw D/2 + 8 nt + 2 tq (+ 1)
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = key_a + mt * 16 + h * 8;
      if (key >= key_end) continue;
      const long long off = ((row_base + key) * kv_heads + kvh) * D + rw * (D / 2) + 2 * tq;
      store_dkv_row<T, NTV>(dk_, dv_, dk_acc, dv_acc, off, dk[mt], dv[mt], h, scale, dkv_mode);
    }
}

}  // namespace moba_bwd

#endif  // MOBALAB_ATTENTION_BWD_BLOCK_CUH
