// MoBA attention forward tile kernel on Hopper warpgroup MMAs (wgmma, sm_90a), variant "wgmma": one key block of
// one kv head per CTA, up to MOBA_WG_TPC = 16 tiles of 64 gathered (query, head, slot) rows (a unit), K and V of
// the block resident in shared memory, for head dim D = 128 and block size B = 32, 64 or 128 (wgmma-ws: 64 or
// 128). Same row bookkeeping (setup_rows), scale_log2, mask and partial (o, m, l) format as attn_resident, so the
// merge and the 16-bit / fp32 partial modules are unchanged; the tile arithmetic:
//   S = Q K^T:  a warpgroup (128 threads) computes a whole 64 x B tile, wgmma m64nBk16 over D / 16 = 8 k-steps,
//               Q (64 x 128) and K (B x 128) K-major in 128-byte-swizzled shared memory (sw128_offset,
//               wgmma_desc_sw128: the layouts of wgmma.cuh, validated by the probe; a tile's descriptor is built
//               once and stepped, wgmma_desc_plus).
//   softmax:    the S accumulator has the mma.sync m16n8 layout per warp (wgmma_acc_row / wgmma_acc_col): masked
//               to -inf, m = scale_log2 max q.k, p = 2^(scale_log2 q.k - m) (one FFMA and one EX2 per element),
//               l = sum p, over all B keys in one step (wg_softmax).
//   O = P V:    P from registers (floats 8s .. 8s+7 of S are the A fragment of keys 16s .. 16s+15, rounded to the
//               input type as the mma path does), V as the MN-major ("transposed") B operand: staged exactly like
//               K and read with imm-trans-b = 1 (wgmma_desc_sw128_mn), one m64n128k16 per k-step (wg_issue_pv).
// Organisation (attn_wgmma): two warpgroups share the resident block; warpgroup w takes tiles w, w + 2, ... of the
// unit, gathers its own rows (cp.async, three tiles deep: two in flight ahead of the one computed) and meets only
// its own threads (named barriers), so one warpgroup's softmax runs while the other's MMAs do. Within a warpgroup
// a tile's softmax reads its S straight from the accumulator, then the tile's P V and the next tile's S are issued
// together and only P V is waited for: the next S runs under the partial writes. (Issuing the next S before the
// softmax instead, on a scaled copy of S, measured 1.5-5.6% slower.) The 16-bit partial rows go through shared
// memory to 16-byte stores (write_partials_staged).
// The CTA finds its unit with a warp-wide search and copies K and V before the row bookkeeping, so that
// bookkeeping's global loads run while the block arrives.
//
// FLOP / byte, per 64-row tile (B keys, D = 128): 2 * 64 * B * 128 FLOP for S and as many for P V, 4.2 MFLOP at
// B = 128: ~1 K clocks of the SM's dense bf16 rate (~4 KFLOP / clock). Global traffic per tile: the Q gather 16 KB
// and the partials 16.5 KB (16-bit o, fp32 m and l; read again by the merge), K and V 64 KB once per unit: 127 FLOP
// per byte, so at 4.3 TB/s the tile kernel's floor at the 64K forward (262 K tiles, 8.7 GB) is ~2 ms, against ~1.2
// ms of MMAs at the dense rate. Shared operands are read once per warpgroup MMA (52 FLOP per shared byte), so
// shared-memory bandwidth does not bound the tile.
// Registers per thread (B = 128): S 64 floats, O 64, P 32 packed, plus addressing: 233 (153 at B = 64, 115 at
// B = 32), no spills.
// Shared memory: K and V 2 B 256 bytes, 2 x 3 Q tiles of 16 KB, 2 x 64 staged partial rows of 272 bytes, 1 KB to
// align the swizzle patterns (195 KB at B = 128), plus 20 KB of static row bookkeeping: one CTA per SM.
// Measured on an H200 (RESULTS.md): the attention forward (index building, tiles, merge) 1.29-1.37x faster than the
// mma.sync resident kernel at B 128 and 1.20x at B 64 (8K-64K), but 0.90-0.92x at B 32, where "auto" keeps the
// resident kernel (three CTAs per SM there against one); the tile kernel at 16K 0.50 ms per launch (0.78 ms for
// the mma.sync kernel), ~1050 warp instructions per warp and tile (1450 before the gather by ignore-src, the
// stepped descriptors, the predicated stores and the unnormalised partials), 6.5 cycles between a warp's
// instructions at 8 warps per SM: dependent-issue latency, not the issue slots (31% busy) or the MMAs, is the
// limit; the unit's prologue (search, bookkeeping, first loads) was ~18% of the stall samples before the warp
// search and the early K / V copy.
// ptxas serialises every wgmma of the kernel (C7515 / C7518) when other instructions define an in-flight
// accumulator (two S arrays swapping roles did) or when a warpgroup may leave early: hence no early return.
//
// Warp-specialised variant (attn_wgmma_ws, kernels moba_attn_wgws_*; variant "wgmma-ws", opt-in). Measured, the
// first form of the kernel above (one warpgroup, two Q tiles, units of 4 tiles) was neither MMA- nor
// bandwidth-bound: at the 64K forward (16.8 M rows, 65.5 K units of 4 tiles) its 9.67 ms are ~39 us per unit
// per CTA, while a unit's MMAs (16.8 MFLOP at B = 128) take ~2.2 us at the SM's dense bf16 peak and its traffic
// (K + V 64 KB, Q gather 64 KB, partials 66 KB: 194 KB, 13 GB for the whole forward, 1.35 TB/s achieved) ~6 us at
// a 4 TB/s share. Each CTA runs setup_rows (dependent global loads), the K / V / Q loads
// and the tiles one after another, and two CTAs per SM hide little of it. So the variant overlaps across units:
//   * warpgroup 0 produces: row bookkeeping (setup_rows) and cp.async of K, V and the gathered Q rows into the same
//     128-byte-swizzled layouts (wg_load_rows), completion signalled by cp.async.mbarrier.arrive.noinc (the
//     consumer fences the generic -> async proxy after its wait). Not TMA: the Q rows are a gather (Hopper's
//     tensor copies have none) and a per-row bulk copy (cp.async.bulk) writes its 256 bytes contiguously, not
//     in the swizzled chunks wgmma reads;
//   * warpgroups 1 and 2 consume: tiles 0, 2 and 1, 3 of a unit against the same resident K / V, each through
//     wg_tile; the softmax of one overlaps the MMAs of the other;
//   * persistent CTAs (grid = SM count) with two K / V + bookkeeping buffers: the producer sets up and loads unit
//     n + 1 while the consumers compute unit n; a Q slot is refilled as soon as its S = Q K^T has completed;
//   * setmaxnreg: producer 56 registers (40 spills setup_rows' 64-bit index arithmetic), consumers 224
//     (S 64 + O 64 + P 32 floats / registers + addressing at B = 128; ptxas: no spills, consumer code up to R210).
// Shared memory: 2 x (K + V) 2 x 2 B 256 bytes + 4 Q slots 64 KB + 1 KB alignment = 193 KB at B = 128 (129 KB at
// B = 64) dynamic, plus 10.3 KB static (bookkeeping twice, mbarriers): one CTA of 384 threads per SM.
// Predicted: the forward becomes bandwidth-bound, ~13 GB at 2.5 - 3 TB/s effective: attention part 4.5 - 6 ms at
// 64K (~170 - 230 TFLOP/s, against 9.67 ms), unless the single producer warpgroup's cp.async issue (64 x 16 bytes
// per thread per unit) or the consumers' softmax becomes the limit.
// Next steps: one m64n128k16 per P V k-step (once the N = 128 transposed-B probe settles the descriptor's LBO);
// within a consumer, S of its next tile issued before the softmax of the current one (registers: 224 - 160).

#ifndef MOBALAB_ATTENTION_WGMMA_CUH
#define MOBALAB_ATTENTION_WGMMA_CUH

#include "attention.cuh"
#include "mbarrier.cuh"
#include "wgmma.cuh"

namespace moba {

constexpr int WG_HEAD_DIM = 128;  // the only head dim of the wgmma kernel
#ifndef MOBA_WG_TPC
#define MOBA_WG_TPC 16  // tiles per CTA of attn_wgmma (the host's WG_TILES_PER_UNIT)
#endif
constexpr int WG_THREADS = 256;  // attn_wgmma: two warpgroups
constexpr int WG_STAGES = 3;     // attn_wgmma: gathered Q tiles per warpgroup (two in flight ahead)
constexpr int WG_Q_BARRIER = 1;  // attn_wgmma: named barriers 1 and 2, one per warpgroup
constexpr int WG_STAGE_PITCH = WG_HEAD_DIM * 2 + 16;  // bytes per staged 16-bit partial row (conflict-free)
constexpr unsigned WG_STAGE_BYTES = MOBA_ROWS * WG_STAGE_PITCH;  // one warpgroup's 64 staged rows

// write_partials for 16-bit partials through shared memory: each warp stores its 16 rows of o (partial_scale,
// rounded to T) at `stage` (WG_STAGE_PITCH bytes per row: the quads' 4-byte stores of a warp hit 32 banks), then
// copies them to their pairs' rows in 16-byte chunks (lane: chunk lane % 16 of rows lane / 16 + 2 i): 8 16-byte
// stores per thread instead of 32 4-byte ones (their issue queue, lg_throttle, and the waits behind it were ~20% of
// the stall samples of the direct stores). A warp reads back only the rows it wrote, so it meets only its own
// lanes (__syncwarp) where a named barrier of the warpgroup made its four warps wait for one another. m and l as
// write_partials.
template <typename T>
__device__ __forceinline__ void write_partials_staged(const float (&o)[WG_HEAD_DIM / 8][4], const float (&m_r)[2],
                                                      float (&l_r)[2], const long long* s_pair, int r0, int r1,
                                                      int count, T* part_o, float* part_ml, int lane, int warp,
                                                      unsigned stage) {
  constexpr int D = WG_HEAD_DIM;
  const int tq = lane & 3;
  quad_sum_l(l_r);
  __syncwarp();  // the warp's reads of its previous tile's rows are done
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r ? r1 : r0;
    const float inv = partial_scale<T>(l_r[r]);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      st_shared_b32(stage + row * WG_STAGE_PITCH + (8 * dt + 2 * tq) * 2,
                    Elem<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv));
    if (tq == 0 && row < count)
      *reinterpret_cast<float2*>(part_ml + 2 * s_pair[row]) = make_float2(m_r[r], l_r[r]);
  }
  __syncwarp();
  // Loads and stores unconditional but for the store's predicate (a row past count has an unused s_pair entry):
  // branches around them cost ~5 instructions each.
  const int row0 = 16 * warp + (lane >> 4), ch = lane & 15;
  const unsigned src = stage + row0 * WG_STAGE_PITCH + 16 * ch;
  T* dst = part_o + 8 * ch;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 x = ld_shared_v4_f32(src + 2 * i * WG_STAGE_PITCH);  // 8 packed elements, as bits
    st_global_v4_if(dst + s_pair[row0 + 2 * i] * D, x, row0 + 2 * i < count);
  }
}

// Copy ROWS_T rows of D = 128 two-byte elements (row r from src_row(r), or zeros when src_row gives nullptr) into
// a 128-byte-swizzled K-major tile of ROWS_T rows (sw128_offset: two 64-element column blocks). A zero-filled
// chunk still names a valid address (`any`), as load_kv_tile does. NT threads copy (tid < NT).
template <int ROWS_T, int NT = MOBA_THREADS, typename SrcRow>
__device__ __forceinline__ void wg_load_rows(unsigned tile, const SrcRow& src_row, const char* any, int tid) {
  constexpr int CH = WG_HEAD_DIM / 8;
#pragma unroll 4
  for (int c = tid; c < ROWS_T * CH; c += NT) {
    const int row = c / CH, ch = c % CH;
    const char* src = src_row(row);
    cp_async16(tile + sw128_offset(row, ch * 8, ROWS_T), src ? src + ch * 16 : any, src ? 16 : 0);
  }
}

// S = Q K^T of one 64-row tile (Q at shared address sq, K at sk; 64 x B, 8 k-steps over D) as one commit group,
// not waited for: until a wgmma_wait_group covers the group (then wgmma_fence_operand(s)) the caller neither reads
// nor writes s, nor refills the Q tile.
template <typename T, int B>
__device__ __forceinline__ void wg_issue_s(float (&s)[B / 2], unsigned sq, unsigned sk) {
#if MOBA_HAS_WGMMA
  // s is not zeroed: the first k-step overwrites it (scale-d 0), and a register defined outside the MMAs while
  // another group is in flight makes ptxas serialise every wgmma of the kernel (C7515)
  const unsigned long long dq = wgmma_desc_sw128(sq, 0, MOBA_ROWS), dk = wgmma_desc_sw128(sk, 0, B);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < WG_HEAD_DIM / 16; ++ks)
    wgmma_ss<T>(s, wgmma_desc_plus(dq, sw128_offset(0, 16 * ks, MOBA_ROWS)),
                wgmma_desc_plus(dk, sw128_offset(0, 16 * ks, B)), ks > 0);
  wgmma_commit_group();
#endif
}

// The softmax of a tile whose S (waited for) is in x, in units that `scale` (> 0) takes to log2 units (x is S and
// scale is scale_log2, or x is scale_log2 S and scale 1; x is masked in place): m = scale max x, p = 2^(scale x -
// m) (one FFMA per element), l = sum p over all B keys in one step, P rounded to the input type into the
// packed A fragments pa (pa[kk]: keys 16 kk .. 16 kk + 15, floats 8 kk .. 8 kk + 7 of S in pairs). Rows r0 = 16
// warp + g and r1 = r0 + 8 of the warpgroup (g = lane / 4, tq = lane % 4) hold queries row_t0 and row_t1; t_min
// is the smallest query of the tile (whether the causal mask can bite). m_r and l_r in write_partials' layout (l a
// per-thread partial sum).
template <typename T, int B>
__device__ __forceinline__ void wg_softmax(float (&x)[B / 2], float scale, int key_begin, int seqlen, int causal,
                                           int t_min, int row_t0, int row_t1, int tq, unsigned (&pa)[B / 16][4],
                                           float (&m_r)[2], float (&l_r)[2]) {
  constexpr int NT = B / 8;  // 8-key column groups of S
  // Float i = 4 nt + e holds key key_begin + 8 nt + 2 tq + (e & 1) of row r0 (e < 2) or r1; -inf stays -inf under
  // the positive scale.
  const bool need_mask = (key_begin + B > seqlen) || (causal && key_begin + B - 1 > t_min);
  auto visible = [&](int i) {
    const int key = key_begin + (i >> 2) * 8 + 2 * tq + (i & 1);
    return key < seqlen && (!causal || key <= ((i & 2) ? row_t1 : row_t0));
  };
  if (need_mask) {
#pragma unroll
    for (int i = 0; i < B / 2; ++i)
      if (!visible(i)) x[i] = neg_inf();
  }
  // The row maximum and sum over four partial results each: dependency chains of NT / 4 instead of NT (a
  // warp's dependent-issue latency, not the instruction count, sets the tile's time at two warps per scheduler).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mq[4] = {neg_inf(), neg_inf(), neg_inf(), neg_inf()};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mq[nt & 3] = fmaxf(mq[nt & 3], fmaxf(x[4 * nt + 2 * r], x[4 * nt + 2 * r + 1]));
    float mx = fmaxf(fmaxf(mq[0], mq[1]), fmaxf(mq[2], mq[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    m_r[r] = mx * scale;  // -inf for a row without a visible key
    const float neg_m = (mx == neg_inf()) ? 0.f : -m_r[r];
    float sq[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int i = 4 * nt + 2 * r;
      const float p0 = exp2f(fmaf(x[i], scale, neg_m)), p1 = exp2f(fmaf(x[i + 1], scale, neg_m));
      sq[nt & 3] += p0 + p1;
      pa[nt >> 1][2 * (nt & 1) + r] = wgmma_pack2(wgmma_ab<T>{}, p0, p1);
    }
    l_r[r] = (sq[0] + sq[1]) + (sq[2] + sq[3]);
  }
}

// The P V accumulator o as the flat array of 64 floats the wgmma wrappers and fences take (float i is
// o[i / 4][i % 4]).
__device__ __forceinline__ float (&wg_o_flat(float (&o)[WG_HEAD_DIM / 8][4]))[WG_HEAD_DIM / 2] {
  return *reinterpret_cast<float(*)[WG_HEAD_DIM / 2]>(&o[0][0]);
}

// Issues O = P V as one commit group, not waited for: P from registers (pa), V MN-major at sv, all D = 128 columns
// per k-step (m64n128k16; float i of the accumulator is column 8 (i / 4) + 2 tq + i % 2: o[i / 4][i % 4],
// write_partials' layout). o is written by the first k-step (scale-d 0).
template <typename T, int B>
__device__ __forceinline__ void wg_issue_pv(const unsigned (&pa)[B / 16][4], unsigned sv,
                                            float (&o)[WG_HEAD_DIM / 8][4]) {
#if MOBA_HAS_WGMMA
  constexpr int D = WG_HEAD_DIM;
  float(&oo)[D / 2] = wg_o_flat(o);
  const unsigned long long dv = wgmma_desc_sw128_mn(sv, 0, B, D);
  wgmma_fence_operand(oo);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < B / 16; ++kk)
    wgmma_rs<T, 1>(oo, pa[kk], wgmma_desc_plus(dv, sw128_offset(16 * kk, 0, B)), kk > 0);
  wgmma_commit_group();
#endif
}

// The rest of a tile once S (waited for, scaled to log2 units) is in x: wg_softmax, then before_pv() (the
// warp-specialised kernel waits for V there), then O = P V, waited for: ends with every MMA group of the warpgroup
// complete (wgmma_wait_group<0>).
template <typename T, int B, typename BeforePV>
__device__ __forceinline__ void wg_softmax_pv(float (&x)[B / 2], unsigned sv, int key_begin, int seqlen,
                                              int causal, int t_min, int row_t0, int row_t1, int tq,
                                              float (&o)[WG_HEAD_DIM / 8][4], float (&m_r)[2], float (&l_r)[2],
                                              const BeforePV& before_pv) {
#if MOBA_HAS_WGMMA
  unsigned pa[B / 16][4];
  wg_softmax<T, B>(x, 1.f, key_begin, seqlen, causal, t_min, row_t0, row_t1, tq, pa, m_r, l_r);
  before_pv();  // V is in shared memory and visible to the async proxy
  wg_issue_pv<T, B>(pa, sv, o);
  wgmma_wait_group<0>();
  wgmma_fence_operand(wg_o_flat(o));
#endif
}

// One 64-row tile against the resident key block, S waited for at once: wg_issue_s, then after_s() (the Q tile
// may be overwritten), then wg_softmax_pv. Called when the tile has at least one key (key_end > key_begin).
template <typename T, int B, typename AfterS, typename BeforePV>
__device__ __forceinline__ void wg_tile(unsigned sq, unsigned sk, unsigned sv, int key_begin, int seqlen, int causal,
                                        int t_min, int row_t0, int row_t1, int tq, float scale_log2,
                                        float (&o)[WG_HEAD_DIM / 8][4], float (&m_r)[2], float (&l_r)[2],
                                        const AfterS& after_s, const BeforePV& before_pv) {
#if MOBA_HAS_WGMMA
  float s[B / 2];
  wg_issue_s<T, B>(s, sq, sk);
  wgmma_wait_group<0>();
  wgmma_fence_operand(s);
  after_s();
#pragma unroll
  for (int i = 0; i < B / 2; ++i) s[i] *= scale_log2;
  wg_softmax_pv<T, B>(s, sv, key_begin, seqlen, causal, t_min, row_t0, row_t1, tq, o, m_r, l_r, before_pv);
#endif
}

template <typename T, int B>
__device__ __forceinline__ void attn_wgmma(const void* q_, const void* k_, const void* v_, const long long* pairs,
                                           const long long* seg_off, const long long* tile_cum, void* part_o,
                                           float* part_ml, int seqlen, int heads, int kv_heads, int top_k,
                                           int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0,
                                           int n_seg, int causal, float scale_log2) {
#if MOBA_HAS_WGMMA
  static_assert(B == 32 || B == 64 || B == 128, "block size");
  constexpr int D = WG_HEAD_DIM;
  constexpr int NS = B / 2;
  constexpr int UNIT = MOBA_ROWS * MOBA_WG_TPC;
  constexpr unsigned Q_BYTES = sw128_tile_bytes(MOBA_ROWS, D);
  constexpr unsigned KV_BYTES = sw128_tile_bytes(B, D);
  extern __shared__ unsigned char smem[];
  __shared__ long long s_qoff[UNIT];
  __shared__ long long s_pair[UNIT];
  __shared__ int s_t[UNIT];
  __shared__ int s_mm[2 * UNIT / 32];
  __shared__ int s_seg;

  // wg through a shuffle from lane 0: ptxas then knows it is warp-uniform, and the shared addresses and wgmma
  // descriptors derived from it live in uniform registers (no R2UR per descriptor).
  const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid >> 7, 0), wt = tid & 127, lane = tid & 31,
            warp = (tid >> 5) & 3;
  if (block_size != B) __trap();  // the launch plan picks the kernel of the block size
  const int seg = cta_unit_segment(tile_cum, n_seg, blockIdx.x, &s_seg);
  if (seg < 0) return;  // uniform
  const UnitRows unit = unit_rows<UNIT>(tile_cum, seg_off, seg, blockIdx.x);
  const int n_rows = unit.n_rows;
  const int n_tiles = (n_rows + MOBA_ROWS - 1) / MOBA_ROWS;
  const int kvc = seg / n_blocks, j = seg % n_blocks;
  const int kvh = h0 / (heads / kv_heads) + kvc;

  // Swizzle patterns start 1024-byte aligned (wgmma.cuh); the launch adds 1024 bytes of slack.
  const unsigned sk = (smem_u32(smem) + SW128_PATTERN_BYTES - 1) & ~(SW128_PATTERN_BYTES - 1);
  const unsigned sv = sk + KV_BYTES;
  const unsigned sq = sv + KV_BYTES + wg * WG_STAGES * Q_BYTES;  // this warpgroup's Q buffers
  const unsigned stage = sv + KV_BYTES + 2 * WG_STAGES * Q_BYTES + wg * WG_STAGE_BYTES;  // its staged partials
  const long long kv_row_bytes = static_cast<long long>(kv_heads) * D * 2;
  const long long kv_base = ((static_cast<long long>(batch_index) * seqlen) * kv_heads + kvh) * D * 2;
  const char* kb = static_cast<const char*>(k_) + kv_base;
  const char* vb = static_cast<const char*>(v_) + kv_base;
  const int key_begin = j * block_size;
  // The key block, resident, copied by both warpgroups; keys beyond seqlen are zero-filled (and masked). V is
  // staged like K: read as the MN-major B operand of P V. Copied before the row bookkeeping, whose dependent
  // global loads then run while K and V arrive.
  wg_load_rows<B, WG_THREADS>(
      sk, [&](int r) { return key_begin + r < seqlen ? kb + (key_begin + r) * kv_row_bytes : nullptr; }, kb, tid);
  wg_load_rows<B, WG_THREADS>(
      sv, [&](int r) { return key_begin + r < seqlen ? vb + (key_begin + r) * kv_row_bytes : nullptr; }, vb, tid);
  cp_async_commit();
  setup_rows<D, UNIT, WG_THREADS>(pairs, unit.first, n_rows, top_k, n_q, t0, h0, seqlen, heads, batch_index, s_qoff,
                                  s_pair, s_t, s_mm);
  __syncthreads();

  // Warpgroup wg takes tiles wg, wg + 2, ...: its u-th is tile 2 u + wg, gathered into buffer u % WG_STAGES by
  // the warpgroup's own threads. One commit group per gather, empty ones included, so that the count a thread
  // waits for does not depend on the number of tiles.
  const int n_mine = (n_tiles - wg + 1) / 2;
  const char* qb = static_cast<const char*>(q_);
  // Thread wt copies chunk wt % 16 of rows wt / 16 + 8 i (i < 8): rows 8 apart share the swizzle phase, so the
  // chunk's shared address moves by 8 rows' bytes per copy, and one source offset per copy is all that varies.
  const int g_row = wt >> 4, g_ch = wt & 15;
  const unsigned g_dst = sq + sw128_offset(g_row, 8 * g_ch, MOBA_ROWS);
  const char* g_src = qb + 16 * g_ch;
  auto gather = [&](int u) {
    const long long* qoff = s_qoff + (2 * u + wg) * MOBA_ROWS + g_row;
    const unsigned dst = g_dst + (u % WG_STAGES) * Q_BYTES;
#pragma unroll
    for (int i = 0; i < MOBA_ROWS / 8; ++i) {
      const long long off = qoff[8 * i];  // -1: a padding row, zero-filled (its address is not read)
      cp_async16_zero_if(dst + 8 * i * SW128_ROW_BYTES, g_src + off * 2, off < 0);
    }
  };
  static_assert(MOBA_ROWS * WG_HEAD_DIM / 8 == 8 * 128, "a warpgroup copies 8 chunks per thread of a 64-row tile");
#pragma unroll
  for (int u = 0; u < WG_STAGES; ++u) {
    if (u < n_mine) gather(u);
    cp_async_commit();
  }
  cp_async_wait<WG_STAGES - 1>();  // K, V and this thread's rows of tile 0
  fence_proxy_async_shared();      // cp.async data -> visible to wgmma (async proxy) after the barrier
  __syncthreads();                 // the CTA's last: from here each warpgroup meets only its own threads
  // No early exit for a warpgroup without tiles (n_mine 0: its S of buffer 0 is issued and waited for, unused):
  // a return here puts every later wgmma on a path ptxas treats as divergent, and it serialises them (C7518).

  const int g = lane >> 2, tq = lane & 3;
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's accumulator rows (wgmma_acc_row)

  auto partials = [&](float (&o)[D / 8][4], const float (&m_r)[2], float (&l_r)[2], int base, int count) {
    if constexpr (kSameType<PartialElem<T>, T>) {
      write_partials_staged<T>(o, m_r, l_r, s_pair + base, r0, r1, count, static_cast<T*>(part_o), part_ml, lane,
                               warp, stage);
    } else {  // the fp32 partial module: 512-byte rows, no room to stage them
      write_partials<T, PartialElem<T>, D>(o, m_r, l_r, s_pair + base, r0, r1, count,
                                          static_cast<PartialElem<T>*>(part_o), part_ml, lane);
    }
  };
  float s[NS];
  wg_issue_s<T, B>(s, sq, sk);
  // Tile u's S was issued into s before step u. The step computes the softmax straight from s (the scale folded
  // into the exponent's FFMA; no MMA group is in flight then) into P, then issues tile u's P V and, once tile u +
  // 1's rows landed, tile u + 1's S into s, refills buffer u % 3 with tile u + 3's rows, and waits for P V only:
  // tile u + 1's S runs under tile u's partial writes. The softmax runs without an MMA of its own warpgroup in
  // flight; issuing tile u + 1's S before it needs a copy of S (64 registers and multiplies; with two S arrays
  // swapping roles instead ptxas serialises the wgmma, C7515) and measured 1.5-5.6% slower.
#pragma unroll 1
  for (int u = 0; u < n_mine; ++u) {
    const int ti = 2 * u + wg;
    const int base = ti * MOBA_ROWS;
    const int count = min(MOBA_ROWS, n_rows - base);
    wgmma_wait_group<0>();  // tile u's S
    wgmma_fence_operand(s);
    float scale = scale_log2;
    if (scale <= 0.f) {  // uniform, rare: wg_softmax folds a positive scale into its exponent only
#pragma unroll
      for (int i = 0; i < NS; ++i) s[i] *= scale_log2;
      scale = 1.f;
    }
    unsigned pa[B / 16][4];
    float m_r[2], l_r[2];
    // a tile without a visible key (not seen with causal routing) comes out masked: m = -inf, l = 0, o = 0
    wg_softmax<T, B>(s, scale, key_begin, seqlen, causal, min(s_mm[4 * ti], s_mm[4 * ti + 2]), s_t[base + r0],
                     s_t[base + r1], tq, pa, m_r, l_r);
    const bool more = u + 1 < n_mine;  // uniform per warpgroup
    if (more) {
      cp_async_wait<WG_STAGES - 2>();  // tile u + 1's rows (tile u + 2's may still be in flight)
      fence_proxy_async_shared();
      // every thread's rows of tile u + 1 landed, tile u's S complete
      bar_sync(WG_Q_BARRIER + wg, 128);
    }
    float o[D / 8][4];  // written by the first P V MMA (scale-d 0)
    wg_issue_pv<T, B>(pa, sv, o);
    if (more) {
      wg_issue_s<T, B>(s, sq + ((u + 1) % WG_STAGES) * Q_BYTES, sk);
      if (u + WG_STAGES < n_mine) gather(u + WG_STAGES);
      cp_async_commit();
      wgmma_wait_group<1>();  // tile u's P V; tile u + 1's S stays in flight
    } else {
      wgmma_wait_group<0>();
    }
    wgmma_fence_operand(wg_o_flat(o));
    partials(o, m_r, l_r, base, count);
  }
  wgmma_wait_group<0>();  // tile 0's S of a warpgroup without tiles
  cp_async_wait<0>();     // the empty groups after the last gather
#else
  __trap();  // wgmma exists on sm_90a only
#endif
}

// ---- warp-specialised variant ---------------------------------------------------------------------------------
// attn_wgmma_ws: three warpgroups. Warpgroup 0 produces (row bookkeeping, K, V and the gathered Q rows, all with
// cp.async into the layouts above); warpgroups 1 and 2 consume, each on its own 64-row tiles of the unit (tiles
// 0, 2 and 1, 3) against the same resident K and V. The CTA is persistent: it takes units blockIdx.x,
// blockIdx.x + gridDim.x, ... (the launch caps the grid at the SM count) and the producer loads unit n + 1
// (its own K / V buffer, bookkeeping buffer and the freed Q slots) while the consumers compute unit n. Buffers
// change hands through mbarriers (mbarrier.cuh); every barrier completes exactly one phase per unit that uses
// it, so the parity a thread waits for follows from the CTA's unit counter `it` alone:
//   full_k[b]  (b = it & 1; 256 arrivals: 128 producer arrives after writing the bookkeeping of buffer b, 128
//              cp.async arrivals when K landed)            waited by consumers, parity (it >> 1) & 1
//   full_v[b]  (128 cp.async arrivals, V landed)            waited by consumers before P V, same parity
//   done[b]    (256 consumer arrivals after the unit's partials are written: K / V / bookkeeping b are free)
//                                                          waited by the producer for unit it + 2
//   full_q[s]  (slot s = tile s of the unit; 128 cp.async arrivals, also for a missing tile)
//                                                          waited by the consumer of slot s, parity it & 1
//   empty_q[s] (128 arrivals of that consumer once its S MMAs have read the slot, or at once without a tile)
//                                                          waited by the producer for unit it + 1
// A unit past the last (unit_segment_warp = -1) is published as seg -1 through full_k: everyone leaves the loop.
// Registers: the producer drops to WS_PRODUCER_REGS, the consumers rise to WS_CONSUMER_REGS (setmaxnreg):
// 128 x 56 + 256 x 224 = 384 x 168, the launch allocation under __launch_bounds__(384, 1) (at 40 the producer
// spills).
constexpr int WS_THREADS = 3 * MOBA_THREADS;
constexpr int WS_PRODUCER_REGS = 56;
constexpr int WS_CONSUMER_REGS = 224;
static_assert(MOBA_THREADS * WS_PRODUCER_REGS + 2 * MOBA_THREADS * WS_CONSUMER_REGS <= WS_THREADS * 168,
              "register pool of one CTA of 384 threads at 168 registers each");

template <typename T, int B>
__device__ __forceinline__ void attn_wgmma_ws(const void* q_, const void* k_, const void* v_, const long long* pairs,
                                              const long long* seg_off, const long long* tile_cum, void* part_o,
                                              float* part_ml, int seqlen, int heads, int kv_heads, int top_k,
                                              int block_size, int n_blocks, int batch_index, int h0, int n_q, int t0,
                                              int n_seg, int causal, float scale_log2) {
#if MOBA_HAS_WGMMA
  static_assert(B == 64 || B == 128, "block size");
  static_assert(MOBA_TPC == 4, "two consumers take tiles c and c + 2 of a unit");
  constexpr int D = WG_HEAD_DIM;
  constexpr int UNIT = MOBA_ROWS * MOBA_TPC;
  constexpr unsigned Q_BYTES = sw128_tile_bytes(MOBA_ROWS, D);
  constexpr unsigned KV_BYTES = sw128_tile_bytes(B, D);
  extern __shared__ unsigned char smem[];
  __shared__ long long s_qoff[2][UNIT];
  __shared__ long long s_pair[2][UNIT];
  __shared__ int s_t[2][UNIT];
  __shared__ int s_mm[2][2 * UNIT / 32];
  __shared__ long long s_first[2];
  __shared__ int s_seg[2], s_rows[2];
  __shared__ alignas(8) unsigned long long s_bar[2 + 2 + 2 + 2 * MOBA_TPC];

  const int tid = threadIdx.x;
  if (block_size != B) __trap();  // the launch plan picks the kernel of the block size
  const unsigned bar0 = smem_u32(s_bar);
  auto full_k = [bar0](int b) { return bar0 + 8u * b; };
  auto full_v = [bar0](int b) { return bar0 + 8u * (2 + b); };
  auto done = [bar0](int b) { return bar0 + 8u * (4 + b); };
  auto full_q = [bar0](int s) { return bar0 + 8u * (6 + s); };
  auto empty_q = [bar0](int s) { return bar0 + 8u * (6 + MOBA_TPC + s); };
  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      mbar_init(full_k(b), 2 * MOBA_THREADS);
      mbar_init(full_v(b), MOBA_THREADS);
      mbar_init(done(b), 2 * MOBA_THREADS);
    }
    for (int s = 0; s < MOBA_TPC; ++s) {
      mbar_init(full_q(s), MOBA_THREADS);
      mbar_init(empty_q(s), MOBA_THREADS);
    }
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the warpgroups meet on mbarriers only

  // Swizzle patterns start 1024-byte aligned (wgmma.cuh); the launch adds 1024 bytes of slack.
  // [K0 V0 K1 V1][Q slot 0 .. 3]
  const unsigned s_kv = (smem_u32(smem) + SW128_PATTERN_BYTES - 1) & ~(SW128_PATTERN_BYTES - 1);
  const unsigned s_q = s_kv + 4 * KV_BYTES;
  const int wg = tid / MOBA_THREADS, wtid = tid % MOBA_THREADS;
  const long long kv_row_bytes = static_cast<long long>(kv_heads) * D * 2;

  if (wg == 0) {
    // ---- producer ----
    setmaxnreg_dec<WS_PRODUCER_REGS>();
    const char* qb = static_cast<const char*>(q_);
    for (int it = 0;; ++it) {
      const int b = it & 1;
      const long long unit = blockIdx.x + static_cast<long long>(it) * gridDim.x;
      // The unit's segment and rows (global reads only) before the wait, off the consumers' critical path.
      int seg = -1, rows = 0;
      long long first = 0;
      if (wtid < 32) {
        seg = unit_segment_warp(tile_cum, n_seg, unit, wtid);
        if (wtid == 0 && seg >= 0) {
          const UnitRows r = unit_rows<UNIT>(tile_cum, seg_off, seg, unit);
          first = r.first;
          rows = r.n_rows;
        }
      }
      if (it >= 2) mbar_wait(done(b), ((it >> 1) - 1) & 1);  // unit it - 2 has left buffer b
      if (wtid == 0) {
        s_seg[b] = seg;
        s_first[b] = first;
        s_rows[b] = rows;
      }
      bar_sync(1, MOBA_THREADS);
      seg = s_seg[b];
      if (seg < 0) {  // past the last unit: publish seg -1 (both halves of full_k's count) and leave
        mbar_arrive(full_k(b));
        mbar_arrive_cp_async(full_k(b));
        break;
      }
      const int n_rows = s_rows[b];
      const int n_tiles = (n_rows + MOBA_ROWS - 1) / MOBA_ROWS;
      setup_rows<D, UNIT, MOBA_THREADS>(pairs, s_first[b], n_rows, top_k, n_q, t0, h0, seqlen, heads, batch_index,
                                        s_qoff[b], s_pair[b], s_t[b], s_mm[b]);
      bar_sync(1, MOBA_THREADS);  // every producer thread gathers rows that others set up
      mbar_arrive(full_k(b));     // release: this thread's bookkeeping writes

      const int kvc = seg / n_blocks, j = seg % n_blocks;
      const int kvh = h0 / (heads / kv_heads) + kvc;
      const long long kv_base = ((static_cast<long long>(batch_index) * seqlen) * kv_heads + kvh) * D * 2;
      const char* kb = static_cast<const char*>(k_) + kv_base;
      const char* vb = static_cast<const char*>(v_) + kv_base;
      const int key_begin = j * block_size;
      const unsigned sk = s_kv + 2 * b * KV_BYTES;
      wg_load_rows<B>(sk, [&](int r) { return key_begin + r < seqlen ? kb + (key_begin + r) * kv_row_bytes : nullptr; },
                      kb, wtid);
      mbar_arrive_cp_async(full_k(b));
      wg_load_rows<B>(sk + KV_BYTES,
                      [&](int r) { return key_begin + r < seqlen ? vb + (key_begin + r) * kv_row_bytes : nullptr; },
                      vb, wtid);
      mbar_arrive_cp_async(full_v(b));
      const long long* qoff = s_qoff[b];
#pragma unroll 1
      for (int s = 0; s < MOBA_TPC; ++s) {
        if (it >= 1) mbar_wait(empty_q(s), (it - 1) & 1);  // the consumer of unit it - 1 has read slot s
        if (s < n_tiles)
          wg_load_rows<MOBA_ROWS>(
              s_q + s * Q_BYTES,
              [qoff, qb, s](int r) {
                const long long o = qoff[s * MOBA_ROWS + r];
                return o >= 0 ? qb + o * 2 : static_cast<const char*>(nullptr);
              },
              qb, wtid);
        mbar_arrive_cp_async(full_q(s));
      }
    }
  } else {
    // ---- consumers: warpgroup 1 takes tiles 0 and 2, warpgroup 2 tiles 1 and 3 ----
    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int c = wg - 1;
    const int lane = wtid & 31, warp = wtid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's accumulator rows (wgmma_acc_row)
    for (int it = 0;; ++it) {
      const int b = it & 1;
      const unsigned kv_parity = (it >> 1) & 1;
      mbar_wait(full_k(b), kv_parity);
      const int seg = s_seg[b];
      if (seg < 0) break;
      fence_proxy_async_shared();  // K (written by cp.async, generic proxy) -> wgmma (async proxy)
      const int n_rows = s_rows[b];
      const int n_tiles = (n_rows + MOBA_ROWS - 1) / MOBA_ROWS;
      const int key_begin = (seg % n_blocks) * block_size;
      const int block_end = min(key_begin + block_size, seqlen);
      const unsigned sk = s_kv + 2 * b * KV_BYTES, sv = sk + KV_BYTES;
#pragma unroll 1
      for (int ti = c; ti < MOBA_TPC; ti += 2) {
        mbar_wait(full_q(ti), it & 1);
        if (ti >= n_tiles) {  // uniform: no tile in this slot
          mbar_arrive(empty_q(ti));
          continue;
        }
        fence_proxy_async_shared();  // Q (cp.async) -> wgmma
        const int t_min = min(s_mm[b][4 * ti], s_mm[b][4 * ti + 2]);
        const int t_max = max(s_mm[b][4 * ti + 1], s_mm[b][4 * ti + 3]);
        const int count = min(MOBA_ROWS, n_rows - ti * MOBA_ROWS);
        const int key_end = causal ? min(block_end, t_max + 1) : block_end;
        const int base = ti * MOBA_ROWS;
        const int row_t0 = s_t[b][base + r0], row_t1 = s_t[b][base + r1];

        float o[D / 8][4];
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
        float m_r[2] = {neg_inf(), neg_inf()};
        float l_r[2] = {0.f, 0.f};
        const unsigned eq = empty_q(ti), fv = full_v(b);
        if (key_end > key_begin) {  // uniform
          wg_tile<T, B>(s_q + ti * Q_BYTES, sk, sv, key_begin, seqlen, causal, t_min, row_t0, row_t1, tq, scale_log2,
                        o, m_r, l_r, [eq] { mbar_arrive(eq); },
                        [fv, kv_parity] {
                          mbar_wait(fv, kv_parity);
                          fence_proxy_async_shared();  // V (cp.async) -> wgmma
                        });
        } else {
          mbar_arrive(eq);
        }
        write_partials<T, PartialElem<T>, D>(o, m_r, l_r, s_pair[b] + base, r0, r1, count,
                                            static_cast<PartialElem<T>*>(part_o), part_ml, lane);
      }
      mbar_arrive(done(b));  // this consumer is done with K / V / bookkeeping b
    }
  }
#else
  __trap();  // wgmma exists on sm_90a only
#endif
}

}  // namespace moba

#endif  // MOBALAB_ATTENTION_WGMMA_CUH
