// MoBA attention forward, key-block-major ("full tiles"): device helpers and the templated tile body.
//
// Work unit: one key block j of one kv head, and up to ROWS (query, head, slot) rows that selected it,
// gathered into a dense Q tile from anywhere in the chunk's query range. Per row the CTA computes the
// flash-style partial softmax over the block's keys (token-causal mask key <= t, which only bites in the
// query's own block because selected past blocks end before t):
//     m = max_i x_i,  l = sum_i 2^(x_i - m),  o = sum_i 2^(x_i - m) v_i / l,   x_i = scale*log2(e) * q.k_i
// and writes (o, m, l) to the partial slot of that (query, head, slot). A merge kernel combines a
// query's slots in slot order (deterministic, no float atomics):
//     M = max_s m_s,  w_s = l_s 2^(m_s - M),  out = sum_s w_s o_s / sum_s w_s,  lse = ln2 (M + log2 sum_s w_s).
//
// Tensor cores: mma.sync m16n8k16 (fp32 accumulate) fed by ldmatrix from 16-byte-swizzled shared memory
// (moba::swz in ptx.cuh: conflict-free ldmatrix for rows of 64 to 512 bytes).
//
// Head dims D = 32, 64, 96, 128, 256 (multiples of 16, the MMA k-step); key sub-tile KT = 16, 32 or 64.
// Tile shapes from a FLOP / byte count (per warp and KT-key step; ldmatrix feeds the MMAs at 128 B/clk/SM):
//   D <= 128, 4 warps x 16 rows: S = Q K^T and O += P V are 2 * 16 KT D FLOP each; K and V cost 4 KT D bytes
//     of ldmatrix, Q stays in registers: 16 FLOP/B. Registers: O D / 2, Q D / 4, S KT / 2 (D = 128, KT = 64:
//     64 + 32 + 32, 248 in all with addressing and operand prefetch).
//   D = 256: one warp would need 128 registers of O alone, which leaves no room for Q, S and the operands
//     (tried: spills at every KT). So 8 warps: warps w and w + 4 take the same 16 rows, both compute S over
//     all of D (S is the small half of a step's registers) and each accumulates O for 128 columns
//     (kFwdSplit): 64 O registers, Q re-read from shared memory at each k-step (kQInRegs). Per pair:
//     96 KT D FLOP executed for 64 KT D useful (S twice), ldmatrix 2 (KT D 2 + KT D + 16 D 2) bytes:
//     9.1 useful FLOP/B at KT = 64, no inter-warp traffic. Registers 136 / 167 / 228 (KT 16 / 32 / 64):
//     one CTA of 8 warps per SM, the same warps per SM as two 4-warp CTAs at D = 128.
//   Shared memory: streaming Q 64 D 2 + double-buffered K, V 4 KT D 2 (KT = min(B, 64); 160 KB at D = 256);
//     resident the block's K, V 2 B D 2 + two Q tiles 2 * 64 D 2. The wrappers take the resident kernel
//     when that is at most 96 KB per 4 warps (two 4-warp CTAs, or one 8-warp CTA at D = 256, per SM):
//     B <= 512 / 256 / 128 / 128 / 128 at D = 32 / 64 / 96 / 128 / 256.
//   Global bytes per (query, head, slot) row: Q gather 2 D, partial write and merge read 2 (2 D + 8), the
//     block's K and V 4 B D shared by the 64 (streaming) or up to 256 (resident) rows of a CTA; against
//     4 B D FLOP that is ~4 B / (6 + B / 16) FLOP/B whatever D (4 B / (10 + B / 16) with fp32 partials):
//     the partial round trip is the largest per-row term at every head dim, so the useful FLOP rate should
//     carry over from D = 128, except for the per-row costs that do not scale with D (sort, (m, l), index
//     building), which weigh more at D = 32.
//
// Partial format, per (query, head, slot) pair p: o at part_o + p D, D elements of the input type T (the fp32
// accumulators, rounded to nearest; two columns per 4-byte store), and (m, l) as two fp32 at part_ml + 2 p, o =
// sum_j 2^(x_j - m) v_j unnormalised (the merge divides by the l it sums anyway: no multiply per element in the
// tile kernels), except for fp16 partials, whose o is normalised (o / l): sum_j p_j v_j can exceed fp16's range
// where o / l, a mean of fp16 values, cannot (kPartialNormalised). 2 D + 8 bytes, written once by a tile kernel and
// read once by the merge, which converts o back to fp32 and accumulates in fp32. Built with -DMOBA_PARTIAL_FP32=1,
// o is fp32 instead (4 D + 8 bytes; the run-time fallback, a separate module with the same kernel names). m and l,
// hence lse, are the same under both. At the reference 64K forward (b 2, h 16, d 128, k 8: 16.8 M pairs) that is
// 4.43 GB written and 4.43 GB read (8.72 GB each way with fp32 o): 2.1 ms at 4.27 TB/s instead of 4.1 ms.

#ifndef MOBALAB_ATTENTION_CUH
#define MOBALAB_ATTENTION_CUH

#include "ptx.cuh"

#define MOBA_ROWS 64      // rows (query, slot pairs) per tile = 4 warps x 16
#define MOBA_THREADS 128
#ifndef MOBA_TPC
#define MOBA_TPC 4        // tiles per CTA in the resident kernel (the host's TILES_PER_UNIT)
#endif
#ifndef MOBA_PARTIAL_FP32
#define MOBA_PARTIAL_FP32 0  // 1: fp32 partial o (the fallback); 0: the input type
#endif

namespace moba {

// Copy keys [key0, key0 + KT) of one kv head into a swizzled KT x D tile; keys >= seqlen are zero-filled.
template <int D, int KT, int NTHREADS = MOBA_THREADS>
__device__ __forceinline__ void load_kv_tile(unsigned dst, const char* base, long long row_stride_bytes,
                                             int key0, int seqlen, int tid) {
  constexpr int CH = D / 8;
  constexpr int N = KT * CH;  // 16-byte chunks; not a multiple of the thread count at D = 32, 96 and KT = 16
#pragma unroll
  for (int i = 0; i < (N + NTHREADS - 1) / NTHREADS; ++i) {
    const int c = tid + i * NTHREADS;
    if (N % NTHREADS == 0 || c < N) {
      const int row = c / CH, ch = c % CH;
      const int key = key0 + row;
      const bool ok = key < seqlen;
      const char* src = base + (ok ? static_cast<long long>(key) * row_stride_bytes + ch * 16 : 0);
      cp_async16(dst + swz<D>(row, ch), src, ok ? 16 : 0);
    }
  }
}

// Warps per 16 rows: 1, or 2 at D = 256, where warps w and w + 4 both compute S for rows 16 (w & 3) ..
// and each accumulates O for one half of the columns (64 registers instead of 128). Threads per CTA follow.
template <int D>
constexpr int kFwdSplit = D >= 256 ? 2 : 1;
template <int D>
constexpr int kFwdThreads = MOBA_THREADS * kFwdSplit<D>;

// Whether a warp keeps its Q A-fragments in registers (D / 4 of them) for a whole tile, or re-reads them
// from the swizzled Q tile at every k-step (D = 256: 64 registers beside 64 of O and KT / 2 of S).
template <int D>
constexpr bool kQInRegs = D <= 128;
template <int D>
constexpr int kQFrags = kQInRegs<D> ? D / 16 : 1;  // register A-fragments held (1: an unused placeholder)

// Minimum CTAs per SM for __launch_bounds__. 0: none, ptxas' own choice, which the D = 64 and 128 kernels
// were tuned and measured with (left to itself ptxas caps the D = 96 kernels at 168 registers and spills).
// D = 32: 4 (<= 128 registers); D = 96: 2 (<= 255 registers, 8 warps per SM); D = 256: 1 CTA of 8 warps.
// The resident kernel (RES) at D = 128 with key sub-tiles of <= 32 keys (blocks of 16 and 32 keys): 3 (<= 168
// registers, 12 warps per SM). Its resident CTAs need 45-53 KB of shared memory, so three fit, and its tiles are
// short (one or two sub-tiles of S and P V between a Q gather and a partial write), so a third CTA's warps fill
// the waits. What kept it at two was the Q gather of the next tile inside the tile loop: unrolled, its row
// offsets and addresses were all loaded ahead, 230 registers (and spills under this bound); a loop that is not
// unrolled there (kFwdRolledGather) fits 168 with no spills. Measured on an H200 (RESULTS.md): the attention
// forward at B 32 1.12x faster at 64K, 1.10x at 16K. At KT = 64 (blocks of 64 keys and more) a 168-register bound cost 15-18%
// (spills; at B 128 shared memory allows two CTAs anyway). MOBA_FWD_MINB_SMALL_KT and MOBA_FWD_ROLLED_GATHER
// (build options for measuring) override the 3 and the rolled loop.
#ifndef MOBA_FWD_MINB_SMALL_KT
#define MOBA_FWD_MINB_SMALL_KT 3
#endif
template <int D, int KT, bool RES>
constexpr int kFwdMinBlocks = D == 128 ? (RES && KT <= 32 ? MOBA_FWD_MINB_SMALL_KT : 0)
                              : D == 64 ? 0 : D == 32 ? 4 : D == 96 ? 2 : 1;
// Whether the resident kernel gathers Q in a loop that is not unrolled (gather_q): where the bound above is new.
#ifndef MOBA_FWD_ROLLED_GATHER
#define MOBA_FWD_ROLLED_GATHER 1
#endif
template <int D, int KT>
constexpr bool kFwdRolledGather = MOBA_FWD_ROLLED_GATHER && D == 128 && KT <= 32;

// Element type of the partial o (see "Partial format" above): the input type T, or float when the source is
// built with -DMOBA_PARTIAL_FP32=1 (the run-time fallback selects that module; entry points take void*).
template <typename A, typename B>
constexpr bool kSameType = false;
template <typename A>
constexpr bool kSameType<A, A> = true;
template <typename P>
constexpr bool kIsFloat = kSameType<P, float>;
template <typename T, bool F32>
struct PartialSel {
  using type = T;
};
template <typename T>
struct PartialSel<T, true> {
  using type = float;
};
template <typename T>
using PartialElem = typename PartialSel<T, MOBA_PARTIAL_FP32 != 0>::type;

// One KT-key step of the flash loop for this warp's 16 rows: S = Q K^T, scale, mask, online softmax,
// O += P V. K and V sub-tiles are swizzled KT x D tiles at kt_base / vt_base (shared addresses). Q: the
// A-fragments (unsigned[D / 16][4]) when kQInRegs<D>, else the shared address of the swizzled 64 x D Q tile,
// re-read at every k-step. o: this warp's columns, part dh of kFwdSplit<D>.
template <typename T, int D, int KT, typename QOp>
__device__ __forceinline__ void subtile_step(const QOp& qf, unsigned kt_base, unsigned vt_base, int key0,
                                             int seqlen, int causal, int t_min, int row_t0, int row_t1,
                                             float scale_log2, float (&o)[D / 8 / kFwdSplit<D>][4],
                                             float (&m_r)[2], float (&l_r)[2], int lane, int dh = 0) {
  constexpr int SPLIT = kFwdSplit<D>;
  constexpr int NT = KT / 8;
  constexpr int DT = D / 8 / SPLIT;
  const int tq = lane & 3;
  // S = Q K^T for this warp's 16 rows and KT keys.
  float s[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
  if constexpr (kQInRegs<D>) {
  #pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int kp = 0; kp < D / 32; ++kp) {
        const int row = nt * 8 + (lane & 7), ch = kp * 4 + (lane >> 3);
        unsigned b0, b1, b2, b3;
        ldmatrix_x4(kt_base + swz<D>(row, ch), b0, b1, b2, b3);
        Elem<T>::mma(s[nt], qf[2 * kp], b0, b1);
        Elem<T>::mma(s[nt], qf[2 * kp + 1], b2, b3);
      }
    }
  } else {
    // k-steps outermost: each Q fragment pair is read once per sub-tile and used for all KT keys.
    const int qrow = ((threadIdx.x >> 5) & 3) * 16 + (lane & 15);
#pragma unroll
    for (int kp = 0; kp < D / 32; ++kp) {
      unsigned qa[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        ldmatrix_x4(qf + swz<D>(qrow, (2 * kp + h) * 2 + (lane >> 4)), qa[h][0], qa[h][1], qa[h][2], qa[h][3]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int row = nt * 8 + (lane & 7), ch = kp * 4 + (lane >> 3);
        unsigned b0, b1, b2, b3;
        ldmatrix_x4(kt_base + swz<D>(row, ch), b0, b1, b2, b3);
        Elem<T>::mma(s[nt], qa[0], b0, b1);
        Elem<T>::mma(s[nt], qa[1], b2, b3);
      }
    }
  }

  // Scale to log2 units, then mask (after scaling, so a negative scale cannot turn -inf into +inf).
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
  const bool need_mask = (key0 + KT > seqlen) || (causal && key0 + KT - 1 > t_min);
  if (need_mask) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nt * 8 + 2 * tq + (e & 1);
        const int rt = (e < 2) ? row_t0 : row_t1;
        const bool ok = key < seqlen && (!causal || key <= rt);
        if (!ok) s[nt][e] = neg_inf();
      }
  }

  // Online softmax; l stays a per-thread partial sum (reduced over the quad at the end).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = neg_inf();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_r[r], mx);
    const float m_use = (m_new == neg_inf()) ? 0.f : m_new;
    const float alpha = exp2f(m_r[r] - m_use);
    m_r[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float p0 = exp2f(s[nt][2 * r] - m_use), p1 = exp2f(s[nt][2 * r + 1] - m_use);
      s[nt][2 * r] = p0;
      s[nt][2 * r + 1] = p1;
      sum += p0 + p1;
    }
    l_r[r] = l_r[r] * alpha + sum;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][2 * r] *= alpha;
      o[dt][2 * r + 1] *= alpha;
    }
  }

  // O += P V (P from the S accumulators, rounded to the input type as FlashAttention does).
#pragma unroll
  for (int kk = 0; kk < KT / 16; ++kk) {
    unsigned a[4];
    a[0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16 / SPLIT; ++dp) {
      const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int ch = (SPLIT == 1 ? dp : dh * (D / 16 / SPLIT) + dp) * 2 + (lane >> 4);
      unsigned b0, b1, b2, b3;
      ldmatrix_x4_trans(vt_base + swz<D>(row, ch), b0, b1, b2, b3);
      Elem<T>::mma(o[2 * dp], a, b0, b1);
      Elem<T>::mma(o[2 * dp + 1], a, b2, b3);
    }
  }
}

// l of rows r0 and r1 summed over the quad (each thread holds the sum over its own columns): what the partial
// writers store.
__device__ __forceinline__ void quad_sum_l(float (&l_r)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
    l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
  }
}

// Whether partial o of element type P is stored normalised (divided by l): fp16 only (see the partial format).
template <typename P>
constexpr bool kPartialNormalised = kSameType<P, __half>;

// The factor a partial writer applies to o: 1 / l for normalised partials (0 for a row without a visible key,
// whose o is 0 either way), else 1 (the multiply folds away).
template <typename P>
__device__ __forceinline__ float partial_scale(float l) {
  if constexpr (kPartialNormalised<P>) return l > 0.f ? 1.f / l : 0.f;
  return 1.f;
}

// Partials of this thread's rows r0 and r1 (rows >= count are padding): o times partial_scale (this warp's
// columns, part dh of kFwdSplit<D>), m (log2 units), l (from part 0; every part holds the same m and l). P is the
// element type of part_o: float, or the input type T (an o fragment's two columns packed into one 4-byte store,
// rounded to nearest).
template <typename T, typename P, int D>
__device__ __forceinline__ void write_partials(float (&o)[D / 8 / kFwdSplit<D>][4], const float (&m_r)[2],
                                               float (&l_r)[2], const long long* s_pair, int r0, int r1, int count,
                                               P* part_o, float* part_ml, int lane, int dh = 0) {
  static_assert(kIsFloat<P> || kSameType<P, T>, "partial o is fp32 or the input type");
  constexpr int SPLIT = kFwdSplit<D>;
  constexpr int DT = D / 8 / SPLIT;
  const int tq = lane & 3;
  quad_sum_l(l_r);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r ? r1 : r0;
    if (row < count) {
      const long long p = s_pair[row];
      const float inv = partial_scale<P>(l_r[r]);
      P* dst = part_o + p * D + (SPLIT == 1 ? 0 : dh * (D / SPLIT)) + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        if constexpr (kIsFloat<P>)
          *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
        else
          *reinterpret_cast<unsigned*>(dst + dt * 8) = Elem<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      }
      if (tq == 0 && (SPLIT == 1 || dh == 0))
        *reinterpret_cast<float2*>(part_ml + 2 * p) = make_float2(m_r[r], l_r[r]);
    }
  }
}

// Segment of work unit `unit` (a tile, or a resident unit of tiles): the largest seg with tile_cum[seg] <= unit
// (it owns >= 1 unit), or -1 past the last unit (tile_cum[n_seg] units in all; the grid is sized from an upper
// bound), searched by a whole warp (`lane` its lane): 32 probes per step instead of a binary search's one, so
// ~log32(n_seg) + 1 dependent global loads (4 at 8 K segments instead of 14). Invariant: the answer lies in
// [lo, hi] (tile_cum[lo] <= unit); probes lo + (lane + 1) step cover (lo, hi] and their "<= unit" results are a
// prefix (tile_cum is non-decreasing), so the answer is in [lo + cnt step, lo + (cnt + 1) step - 1].
__device__ __forceinline__ int unit_segment_warp(const long long* tile_cum, int n_seg, long long unit, int lane) {
  if (unit >= tile_cum[n_seg]) return -1;  // warp-uniform
  int lo = 0, hi = n_seg;
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int p = lo + (lane + 1) * step;
    const bool le = p <= hi && tile_cum[p] <= unit;
    lo += __popc(__ballot_sync(0xffffffffu, le)) * step;
    hi = min(hi, lo + step - 1);
  }
  return lo;
}

// The segment of this CTA's work unit: warp 0 searches (unit_segment_warp), every thread reads it after the
// barrier (-1 past the last unit: the same for the whole CTA). Measured: thread 0's binary search, ~13 dependent
// loads at 8 K segments, held every warp at the barrier for ~5% of the wgmma tile kernel's time.
__device__ __forceinline__ int cta_unit_segment(const long long* tile_cum, int n_seg, long long unit, int* s_seg) {
  if (threadIdx.x < 32) {
    const int seg = unit_segment_warp(tile_cum, n_seg, unit, threadIdx.x);
    if (threadIdx.x == 0) *s_seg = seg;
  }
  __syncthreads();
  return *s_seg;
}

// The rows of work unit `unit` (of UNIT rows) in segment seg: its first row in the pair list and its row count.
struct UnitRows {
  long long first;
  int n_rows;
};
template <int UNIT>
__device__ __forceinline__ UnitRows unit_rows(const long long* tile_cum, const long long* seg_off, int seg,
                                              long long unit) {
  const long long first = seg_off[seg] + (unit - tile_cum[seg]) * UNIT;
  return {first, static_cast<int>(min(static_cast<long long>(UNIT), seg_off[seg + 1] - first))};
}

// Query tt (of the chunk's) and head hc (of its first) of a pair id p = (hc * n_q + tt) * top_k + slot below 2^31 (every
// pair id of a chunk that fits in memory): 32-bit division, a quarter of the instructions of the 64-bit one
// (measured: setup_rows' divisions were ~10% of the wgmma tile's).
__device__ __forceinline__ void pair_query_head(long long p, int top_k, int n_q, int& tt, int& hc) {
  const unsigned rest = static_cast<unsigned>(p) / static_cast<unsigned>(top_k);
  tt = static_cast<int>(rest % static_cast<unsigned>(n_q));
  hc = static_cast<int>(rest / static_cast<unsigned>(n_q));
}

// Row bookkeeping shared by both tile kernels: rows [0, n_rows) of this CTA's list start at pairs[first].
// Pair p = (hc * n_q + tt) * top_k + slot is its partial slot; its query is t = t0 + tt, head h0 + hc.
// s_mm[2 * g], s_mm[2 * g + 1] get (min t, max t) of 32-row group g (padding rows ignored).
template <int D, int NROWS, int NTHREADS = MOBA_THREADS>
__device__ __forceinline__ void setup_rows(const long long* pairs, long long first, int n_rows, int top_k, int n_q,
                                           int t0, int h0, int seqlen, int heads, int batch_index,
                                           long long* s_qoff, long long* s_pair, int* s_t, int* s_mm) {
  const int tid = threadIdx.x, lane = tid & 31;
#pragma unroll
  for (int pass = 0; pass < (NROWS + NTHREADS - 1) / NTHREADS; ++pass) {
    const int r = tid + pass * NTHREADS;
    if (r < NROWS) {  // warp-uniform: NROWS is a multiple of 32
      long long qoff = -1, p = -1;
      int t = 0x7fffffff;
      if (r < n_rows) {
        p = pairs[first + r];
        int tt, hc;
        if (p <= 0x7fffffff) {
          pair_query_head(p, top_k, n_q, tt, hc);
        } else {
          const long long rest = p / top_k;
          tt = static_cast<int>(rest % n_q);
          hc = static_cast<int>(rest / n_q);
        }
        t = t0 + tt;
        qoff = ((static_cast<long long>(batch_index) * seqlen + t) * heads + (h0 + hc)) * D;
      }
      s_qoff[r] = qoff;
      s_pair[r] = p;
      s_t[r] = t;
      int tmin = (r < n_rows) ? t : 0x7fffffff, tmax = (r < n_rows) ? t : -1;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        tmin = min(tmin, __shfl_xor_sync(0xffffffffu, tmin, o));
        tmax = max(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
      }
      if (lane == 0) {
        s_mm[2 * (r >> 5)] = tmin;
        s_mm[2 * (r >> 5) + 1] = tmax;
      }
    }
  }
}

// Gather MOBA_ROWS query rows (element offsets s_qoff, -1 = zero row) into a swizzled tile.
// ROLLED: a loop that is not unrolled, for kernels under a register bound (the unrolled loop's addresses,
// all loaded ahead, spill at 168 registers).
template <int D, int NTHREADS = MOBA_THREADS, bool ROLLED = false>
__device__ __forceinline__ void gather_q(unsigned dst, const char* qb, const long long* s_qoff, int tid) {
  constexpr int CH = D / 8;
  auto copy = [&](int i) {
    const int c = tid + i * NTHREADS;
    const int row = c / CH, ch = c % CH;
    const long long off = s_qoff[row];
    cp_async16(dst + swz<D>(row, ch), qb + (off >= 0 ? off * 2 + ch * 16 : 0), off >= 0 ? 16 : 0);
  };
  if constexpr (ROLLED) {
#pragma unroll 1
    for (int i = 0; i < MOBA_ROWS * CH / NTHREADS; ++i) copy(i);
  } else {
#pragma unroll
    for (int i = 0; i < MOBA_ROWS * CH / NTHREADS; ++i) copy(i);
  }
}

// A fragments of this warp's 16 rows of a swizzled MOBA_ROWS x D Q tile at shared address sq.
template <int D>
__device__ __forceinline__ void load_q_fragments(unsigned (&qf)[D / 16][4], unsigned sq, int warp, int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int row = warp * 16 + (lane & 15), ch = ks * 2 + (lane >> 4);
    ldmatrix_x4(sq + swz<D>(row, ch), qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3]);
  }
}

// One CTA = one tile (blockIdx.x); tile_cum[seg] .. tile_cum[seg+1] are the tiles of segment seg =
// (chunk kv head kvc, key block j), whose rows are pairs[seg_off[seg] .. seg_off[seg+1]).
template <typename T, int D, int KT>
__device__ __forceinline__ void attn_tile(const void* q_, const void* k_, const void* v_, const long long* pairs,
                                          const long long* seg_off, const long long* tile_cum, void* part_o,
                                          float* part_ml, int seqlen, int heads, int kv_heads, int top_k,
                                          int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0,
                                          int n_seg, int causal, float scale_log2) {
  static_assert(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, "head dim");
  static_assert(KT == 16 || KT == 32 || KT == 64, "key tile");
  constexpr int SPLIT = kFwdSplit<D>;
  constexpr int NTHREADS = kFwdThreads<D>;
  constexpr int DT = D / 8 / SPLIT;  // n-tiles of O per warp
  MOBA_DYNAMIC_SMEM(smem);
  unsigned char* sQ = smem;                    // ROWS x D
  unsigned char* sK = sQ + MOBA_ROWS * D * 2;  // 2 x KT x D
  unsigned char* sV = sK + 2 * KT * D * 2;     // 2 x KT x D
  __shared__ long long s_qoff[MOBA_ROWS];      // element offset of the query row, -1 = padding row
  __shared__ long long s_pair[MOBA_ROWS];
  __shared__ int s_t[MOBA_ROWS];
  __shared__ int s_seg;
  __shared__ int s_mm[4];  // (min t, max t) of rows 0..31 and 32..63

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int seg = cta_unit_segment(tile_cum, n_seg, blockIdx.x, &s_seg);
  if (seg < 0) return;  // uniform
  const UnitRows unit = unit_rows<MOBA_ROWS>(tile_cum, seg_off, seg, blockIdx.x);
  const long long first = unit.first;
  const int count = unit.n_rows;
  const int kvc = seg / n_blocks, j = seg % n_blocks;
  const int group = heads / kv_heads;
  const int kvh = h0 / group + kvc;
  setup_rows<D, MOBA_ROWS, NTHREADS>(pairs, first, count, top_k, n_q, t0, h0, seqlen, heads, batch_index, s_qoff,
                                     s_pair, s_t, s_mm);
  __syncthreads();
  const int t_min = min(s_mm[0], s_mm[2]), t_max = max(s_mm[1], s_mm[3]);

  const char* qb = static_cast<const char*>(q_);
  const unsigned sq = smem_u32(sQ);
  gather_q<D, NTHREADS>(sq, qb, s_qoff, tid);
  const long long kv_row_bytes = static_cast<long long>(kv_heads) * D * 2;
  const long long kv_base = ((static_cast<long long>(batch_index) * seqlen) * kv_heads + kvh) * D * 2;
  const char* kb = static_cast<const char*>(k_) + kv_base;
  const char* vb = static_cast<const char*>(v_) + kv_base;
  const unsigned sk = smem_u32(sK), sv = smem_u32(sV);
  constexpr unsigned KV_BYTES = KT * D * 2;

  // Keys this tile needs: the block's real keys, and under the causal mask none beyond the last row's t.
  const int key_begin = j * block_size;
  int key_end = min(key_begin + block_size, seqlen);
  if (causal) key_end = min(key_end, t_max + 1);
  const int n_sub = key_end > key_begin ? (key_end - key_begin + KT - 1) / KT : 0;

  if (n_sub > 0) {
    load_kv_tile<D, KT, NTHREADS>(sk, kb, kv_row_bytes, key_begin, seqlen, tid);
    load_kv_tile<D, KT, NTHREADS>(sv, vb, kv_row_bytes, key_begin, seqlen, tid);
  }
  cp_async_commit();

  // This thread's two rows (g and g + 8 of the warp's 16) and, at D = 256, its half of the O columns.
  const int g = lane >> 2;
  const int rw = SPLIT == 1 ? warp : (warp & 3), dh = SPLIT == 1 ? 0 : (warp >> 2);
  const int r0 = rw * 16 + g, r1 = r0 + 8;
  const int row_t0 = s_t[r0], row_t1 = s_t[r1];

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {neg_inf(), neg_inf()};
  float l_r[2] = {0.f, 0.f};
  unsigned qf[kQFrags<D>][4];

  for (int it = 0; it < n_sub; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_sub) {
      const int nb = buf ^ 1;
      load_kv_tile<D, KT, NTHREADS>(sk + nb * KV_BYTES, kb, kv_row_bytes, key_begin + (it + 1) * KT, seqlen, tid);
      load_kv_tile<D, KT, NTHREADS>(sv + nb * KV_BYTES, vb, kv_row_bytes, key_begin + (it + 1) * KT, seqlen, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kQInRegs<D>) {
      if (it == 0) load_q_fragments<D>(qf, sq, warp, lane);

      subtile_step<T, D, KT>(qf, sk + buf * KV_BYTES, sv + buf * KV_BYTES, key_begin + it * KT, seqlen, causal,
                             t_min, row_t0, row_t1, scale_log2, o, m_r, l_r, lane);
    } else {
      subtile_step<T, D, KT>(sq, sk + buf * KV_BYTES, sv + buf * KV_BYTES, key_begin + it * KT, seqlen, causal,
                             t_min, row_t0, row_t1, scale_log2, o, m_r, l_r, lane, dh);
    }
    __syncthreads();  // everyone is done with buffer `buf` before it is refilled
  }
  cp_async_wait<0>();

  write_partials<T, PartialElem<T>, D>(o, m_r, l_r, s_pair, r0, r1, count, static_cast<PartialElem<T>*>(part_o),
                                      part_ml, lane, dh);
}

// Resident variant: one CTA = one unit of up to MOBA_TPC tiles of one segment. The whole key block (K and
// V, block_size x D each) is loaded into shared memory once and reused by every tile of the unit; the next
// tile's queries are gathered (cp.async) while the current tile computes. tile_cum counts units here.
template <typename T, int D, int KT>
__device__ __forceinline__ void attn_resident(const void* q_, const void* k_, const void* v_, const long long* pairs,
                                              const long long* seg_off, const long long* tile_cum, void* part_o,
                                              float* part_ml, int seqlen, int heads, int kv_heads, int top_k,
                                              int block_size, int n_blocks, int batch_index, int h0, int n_q,
                                              int t0, int n_seg, int causal, float scale_log2) {
  constexpr int SPLIT = kFwdSplit<D>;
  constexpr int NTHREADS = kFwdThreads<D>;
  constexpr int CH = D / 8;
  constexpr int DT = D / 8 / SPLIT;
  constexpr int UNIT = MOBA_ROWS * MOBA_TPC;
  constexpr unsigned Q_BYTES = MOBA_ROWS * D * 2;
  MOBA_DYNAMIC_SMEM(smem);
  __shared__ long long s_qoff[UNIT];
  __shared__ long long s_pair[UNIT];
  __shared__ int s_t[UNIT];
  __shared__ int s_mm[2 * UNIT / 32];
  __shared__ int s_seg;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int seg = cta_unit_segment(tile_cum, n_seg, blockIdx.x, &s_seg);
  if (seg < 0) return;  // uniform
  const UnitRows unit = unit_rows<UNIT>(tile_cum, seg_off, seg, blockIdx.x);
  const long long first = unit.first;
  const int n_rows = unit.n_rows;
  const int n_tiles = (n_rows + MOBA_ROWS - 1) / MOBA_ROWS;
  const int kvc = seg / n_blocks, j = seg % n_blocks;
  const int kvh = h0 / (heads / kv_heads) + kvc;

  // The key block, resident: rows beyond seqlen zero-filled (and masked). Copied before the row bookkeeping,
  // whose dependent global loads then run while K and V arrive.
  const unsigned sk = smem_u32(smem);
  const unsigned sv = sk + static_cast<unsigned>(block_size) * D * 2;
  const unsigned sq = sv + static_cast<unsigned>(block_size) * D * 2;
  const long long kv_row_bytes = static_cast<long long>(kv_heads) * D * 2;
  const long long kv_base = ((static_cast<long long>(batch_index) * seqlen) * kv_heads + kvh) * D * 2;
  const char* kb = static_cast<const char*>(k_) + kv_base;
  const char* vb = static_cast<const char*>(v_) + kv_base;
  const int key_begin = j * block_size;
  for (int c = tid; c < block_size * CH; c += NTHREADS) {
    const int row = c / CH, ch = c % CH;
    const int key = key_begin + row;
    const bool ok = key < seqlen;
    const long long off = ok ? static_cast<long long>(key) * kv_row_bytes + ch * 16 : 0;
    cp_async16(sk + swz<D>(row, ch), kb + off, ok ? 16 : 0);
    cp_async16(sv + swz<D>(row, ch), vb + off, ok ? 16 : 0);
  }
  setup_rows<D, UNIT, NTHREADS>(pairs, first, n_rows, top_k, n_q, t0, h0, seqlen, heads, batch_index, s_qoff,
                                s_pair, s_t, s_mm);
  __syncthreads();
  const char* qb = static_cast<const char*>(q_);
  gather_q<D, NTHREADS>(sq, qb, s_qoff, tid);
  cp_async_commit();

  const int g = lane >> 2;
  const int rw = SPLIT == 1 ? warp : (warp & 3), dh = SPLIT == 1 ? 0 : (warp >> 2);
  const int block_end = min(key_begin + block_size, seqlen);
  for (int ti = 0; ti < n_tiles; ++ti) {
    if (ti + 1 < n_tiles) {
      gather_q<D, NTHREADS, kFwdRolledGather<D, KT>>(sq + ((ti + 1) & 1) * Q_BYTES, qb,
                                                     s_qoff + (ti + 1) * MOBA_ROWS, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    unsigned qf[kQFrags<D>][4];
    if constexpr (kQInRegs<D>) load_q_fragments<D>(qf, sq + (ti & 1) * Q_BYTES, warp, lane);
    const int t_min = min(s_mm[4 * ti], s_mm[4 * ti + 2]);
    const int t_max = max(s_mm[4 * ti + 1], s_mm[4 * ti + 3]);
    const int count = min(MOBA_ROWS, n_rows - ti * MOBA_ROWS);
    const int key_end = causal ? min(block_end, t_max + 1) : block_end;
    const int n_sub = key_end > key_begin ? (key_end - key_begin + KT - 1) / KT : 0;
    const int base = ti * MOBA_ROWS;
    const int r0 = rw * 16 + g, r1 = r0 + 8;
    const int row_t0 = s_t[base + r0], row_t1 = s_t[base + r1];

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {neg_inf(), neg_inf()};
    float l_r[2] = {0.f, 0.f};
    if constexpr (kQInRegs<D>) {
      for (int it = 0; it < n_sub; ++it) {
        const unsigned off = static_cast<unsigned>(it) * KT * D * 2;
        subtile_step<T, D, KT>(qf, sk + off, sv + off, key_begin + it * KT, seqlen, causal, t_min, row_t0, row_t1,
                               scale_log2, o, m_r, l_r, lane);
      }
    } else {
      for (int it = 0; it < n_sub; ++it) {
        const unsigned off = static_cast<unsigned>(it) * KT * D * 2;
        subtile_step<T, D, KT>(sq + (ti & 1) * Q_BYTES, sk + off, sv + off, key_begin + it * KT, seqlen, causal,
                               t_min, row_t0, row_t1, scale_log2, o, m_r, l_r, lane, dh);
      }
    }
    write_partials<T, PartialElem<T>, D>(o, m_r, l_r, s_pair + base, r0, r1, count,
                                        static_cast<PartialElem<T>*>(part_o), part_ml, lane, dh);
    __syncthreads();  // every warp has its Q fragments (or is done re-reading them) before this Q buffer is refilled
  }
}

// Lanes of a warp that hold a D-element row, V consecutive elements each (8-, 16- or 2 x 16-byte loads of
// fp32, 4-, 8- or 16-byte loads of 16-bit values): all 32 at D = 64, 128 and 256; 16 of 2 at D = 32 and 24
// of 4 at D = 96 (one row per warp in the merges and the backward's row kernels; the idle lanes still take
// part in the shuffles).
template <int D>
constexpr int kRowLaneElems = D == 32 ? 2 : D == 96 ? 4 : D / 32;
template <int D>
constexpr int kRowLanes = D / kRowLaneElems<D>;

// Two 16-bit partial values packed in one 4-byte word (low half first, as Elem<T>::pack writes them) as fp32:
// exact conversions.
__device__ __forceinline__ void unpack_pair(unsigned u, const __nv_bfloat16*, float& lo, float& hi) {
  lo = __uint_as_float(u << 16);
  hi = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void unpack_pair(unsigned u, const __half*, float& lo, float& hi) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u));
  lo = f.x;
  hi = f.y;
}

// This lane's V values of one slot's partial row as fp32, or zeros for a slot that does not count (the
// merges of the forward and of the deterministic dQ). P = float: one 8- or 16-byte load (two at V = 8);
// P = a 16-bit type: one 4-, 8- or 16-byte load of V elements, converted.
template <int V, typename P>
__device__ __forceinline__ void load_slot_slice(float (&x)[V], const P* src, bool used) {
  static_assert(V == 2 || V == 4 || V == 8, "2, 4 or 8 elements per lane");
  static_assert(sizeof(P) == 4 || sizeof(P) == 2, "fp32 or 16-bit partials");
  if (used) {
    if constexpr (sizeof(P) == 2) {
      unsigned w[V / 2];
      if constexpr (V == 8) {
        const uint4 a = *reinterpret_cast<const uint4*>(src);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
      } else if constexpr (V == 4) {
        const uint2 a = *reinterpret_cast<const uint2*>(src);
        w[0] = a.x; w[1] = a.y;
      } else {
        w[0] = *reinterpret_cast<const unsigned*>(src);
      }
#pragma unroll
      for (int i = 0; i < V / 2; ++i) unpack_pair(w[i], src, x[2 * i], x[2 * i + 1]);
    } else if constexpr (V == 8) {
      const float4 a = *reinterpret_cast<const float4*>(src);
      const float4 b = *reinterpret_cast<const float4*>(src + 4);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else if constexpr (V == 4) {
      const float4 t4 = *reinterpret_cast<const float4*>(src);
      x[0] = t4.x; x[1] = t4.y; x[2] = t4.z; x[3] = t4.w;
    } else {
      const float2 t2 = *reinterpret_cast<const float2*>(src);
      x[0] = t2.x; x[1] = t2.y;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = 0.f;
  }
}

// Slots of a row whose partial loads the merge issues together (it streams the partials, so what it keeps in
// flight sets its rate). Eight against four, with one store per lane: 1.006-1.007x at 64K-512K on an H200, DRAM
// 79-80% of peak (77-78%); the L2, 90% busy, bounds it there.
#ifndef MOBA_MERGE_SLOTS
#define MOBA_MERGE_SLOTS 8
#endif

// Merge: one warp per (query, head) of the chunk; slots combined in slot order, in fp32 whatever the partial
// element type P (float or T). out_mode 0: out in T (lse when write_lse); 1: out and lse stored in fp32;
// 2: folded into the fp32 (out, lse) already there by log-sum-exp, for callers that combine the attention over
// several key sets (context parallelism): lse' = log(e^lse + e^lse_new), out' = w out + w_new o with
// w = e^(lse - lse'), w_new = e^(lse_new - lse') (w + w_new = 1; both 0 while neither attends anything).
// Saves the caller's pass that reads T out back and the fold's two passes over fp32.
template <typename T, typename P, int D>
__device__ __forceinline__ void merge_rows(const P* part_o, const float* part_ml, const int* topk, void* out_,
                                           float* lse, int seqlen, int heads, int top_k, int n_blocks,
                                           int batch_index, int h0, int n_heads_c, int t0, int n_q, int write_lse,
                                           int out_mode) {
  static_assert(kIsFloat<P> || kSameType<P, T>, "partial o is fp32 or the input type");
  constexpr int V = kRowLaneElems<D>;  // elements per lane
  const int lane = threadIdx.x & 31;
  const bool holds = kRowLanes<D> == 32 || lane < kRowLanes<D>;  // this lane holds V elements of the row
  const long long w = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= static_cast<long long>(n_heads_c) * n_q) return;
  const int hc = static_cast<int>(w / n_q), tt = static_cast<int>(w % n_q);
  const long long row = (static_cast<long long>(batch_index) * seqlen + (t0 + tt)) * heads + (h0 + hc);
  const long long pbase = w * top_k;

  float mv[2], lv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = lane + 32 * i;
    mv[i] = neg_inf();
    lv[i] = 0.f;
    if (s < top_k) {
      const int jb = topk[row * top_k + s];
      if (jb >= 0 && jb < n_blocks) {
        const float2 ml = *reinterpret_cast<const float2*>(part_ml + 2 * (pbase + s));
        mv[i] = ml.x;
        lv[i] = ml.y;
      }
    }
  }
  float M = fmaxf(mv[0], mv[1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  const float m_use = (M == neg_inf()) ? 0.f : M;
  // slot weight 2^(m - M), times l where o is normalised; L = sum l 2^(m - M) either way
  float wv[2], lw[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float e = lv[i] > 0.f ? exp2f(mv[i] - m_use) : 0.f;
    lw[i] = lv[i] * e;
    wv[i] = kPartialNormalised<P> ? lw[i] : e;
  }
  // Fixed-shape tree sum: deterministic.
  float L = lw[0] + lw[1];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);

  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  const P* src = part_o + pbase * D + lane * V;
  constexpr int U = MOBA_MERGE_SLOTS;  // slots whose loads are in flight together
  for (int s0 = 0; s0 < top_k; s0 += U) {
    float ws[U];
    float x[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u;
      const float wsel = (s < 32) ? wv[0] : wv[1];
      ws[u] = __shfl_sync(0xffffffffu, wsel, s & 31);
      if (s >= top_k) ws[u] = 0.f;
      load_slot_slice<V>(x[u], src + static_cast<long long>(s) * D, holds && ws[u] > 0.f);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = fmaf(ws[u], x[u][e], acc[e]);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const float lse_new = L > 0.f ? (M + log2f(L)) * 0.69314718055994531f : neg_inf();
  if (out_mode == 0) {
    T* out = static_cast<T*>(out_) + row * D + lane * V;
    if (holds) {
      // one store of the lane's V elements (a warp's row in whole sectors per instruction)
      unsigned packed[V / 2];
#pragma unroll
      for (int e = 0; e < V; e += 2) packed[e / 2] = Elem<T>::pack(acc[e] * inv, acc[e + 1] * inv);
      if constexpr (V == 8) {
        *reinterpret_cast<uint4*>(out) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      } else if constexpr (V == 4) {
        *reinterpret_cast<uint2*>(out) = make_uint2(packed[0], packed[1]);
      } else {
        *reinterpret_cast<unsigned*>(out) = packed[0];
      }
    }
    if (write_lse && lane == 0) lse[row] = lse_new;
    return;
  }
  float w_old = 0.f, w_new = inv, lse_out = lse_new;  // store: o = acc / L
  if (out_mode == 2) {
    const float lse_old = lse[row];
    const float top = fmaxf(lse_old, lse_new);
    if (top == neg_inf()) {
      w_new = 0.f;  // neither side attends anything: the zeros stay
    } else {
      const float a = __expf(lse_old - top), b = __expf(lse_new - top);
      const float r = 1.f / (a + b);
      w_old = a * r;
      w_new = b * r * inv;
      lse_out = top + __logf(a + b);
    }
  }
  float* out = static_cast<float*>(out_) + row * D + lane * V;
  if (holds) {
#pragma unroll
    for (int e = 0; e < V; e += 2) {
      float2 o = make_float2(0.f, 0.f);
      if (out_mode == 2) o = *reinterpret_cast<const float2*>(out + e);
      *reinterpret_cast<float2*>(out + e) = make_float2(fmaf(w_new, acc[e], w_old * o.x),
                                                        fmaf(w_new, acc[e + 1], w_old * o.y));
    }
  }
  __syncwarp();  // every lane has read the old lse
  if (lane == 0) lse[row] = lse_out;
}

// Segment keys of a chunk: pair (hc, tt, slot) -> kvc * n_blocks + j, or n_seg for empty / invalid slots.
__device__ __forceinline__ void chunk_keys(const int* topk, int* keys, int seqlen, int heads, int top_k, int n_blocks,
                                           int batch_index, int h0, int n_heads_c, int t0, int n_q, int group) {
  const long long total = static_cast<long long>(n_heads_c) * n_q * top_k;
  const int n_seg = (n_heads_c / group) * n_blocks;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int s = static_cast<int>(i % top_k);
    const long long rest = i / top_k;
    const int tt = static_cast<int>(rest % n_q), hc = static_cast<int>(rest / n_q);
    const int jb = topk[((static_cast<long long>(batch_index) * seqlen + (t0 + tt)) * heads + (h0 + hc)) * top_k + s];
    keys[i] = (jb >= 0 && jb < n_blocks) ? (hc / group) * n_blocks + jb : n_seg;
  }
}

// Segment starts from the sorted keys, in parallel and without atomics: seg_off[s] = first position whose
// key >= s, for s = 0 .. n_seg (each entry is written by exactly one position i in [0, n_pairs]).
__device__ __forceinline__ void chunk_bounds(const int* sorted_keys, long long n_pairs, int n_seg,
                                             long long* seg_off) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i <= n_pairs;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int prev = i == 0 ? -1 : min(sorted_keys[i - 1], n_seg);
    const int cur = i == n_pairs ? n_seg : min(sorted_keys[i], n_seg);
    for (int s = prev + 1; s <= cur; ++s) seg_off[s] = i;
  }
}

// tile_cum = exclusive prefix sum over segments of ceil(count / rows_per_unit), count = seg_off[s+1] -
// seg_off[s] (n_seg + 1 entries). One CTA (512 threads), a contiguous range of segments per thread.
__device__ __forceinline__ void chunk_segments(const long long* seg_off, int n_seg, int rows_per_unit,
                                               long long* tile_cum) {
  __shared__ long long warp_tot[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthr = blockDim.x;
  const int per = (n_seg + nthr - 1) / nthr;
  const int s_begin = min(tid * per, n_seg), s_end = min(s_begin + per, n_seg);
  long long local = 0;
  for (int s = s_begin; s < s_end; ++s) local += (seg_off[s + 1] - seg_off[s] + rows_per_unit - 1) / rows_per_unit;
  long long incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int nw = nthr >> 5;
    long long v = lane < nw ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long y = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += y;
    }
    if (lane < nw) warp_tot[lane] = v;
  }
  __syncthreads();
  long long run = incl - local + (warp > 0 ? warp_tot[warp - 1] : 0);
  for (int s = s_begin; s < s_end; ++s) {
    tile_cum[s] = run;
    run += (seg_off[s + 1] - seg_off[s] + rows_per_unit - 1) / rows_per_unit;
  }
  if (tid == nthr - 1) tile_cum[n_seg] = run;
}

}  // namespace moba

#endif  // MOBALAB_ATTENTION_CUH
