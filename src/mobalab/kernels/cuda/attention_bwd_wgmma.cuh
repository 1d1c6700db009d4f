// MoBA attention backward, variant "wgmma": the work of the "block" variant (attention_bwd_block.cuh: one CTA per
// 128 keys of a key block, every row that selected the block in tiles of 64 gathered rows; same equations, row
// records, gather, dQ modes and dK / dV modes) with the products on Hopper warpgroup MMAs (wgmma, sm_90a). Two
// warpgroups; warpgroup g owns keys 64 g .. 64 g + 63 of the CTA and their dK and dV (all D = 128 columns, fp32
// accumulators in registers over all tiles). Per tile, in four commit groups so that the tensor cores work while
// the warpgroup forms P and dS:
//   1. S^T = K_g Q^T, then dP^T = V_g dO^T: m64n64k16, A = the warpgroup's 64 keys of K (or V), B = the 64 gathered
//      rows of Q (or dO), both K-major over d in 128-byte-swizzled shared memory (wgmma.cuh's sw128 layout):
//      8 k-steps each, 64 fp32 accumulators per thread in all.
//   2. P = 2^(x - lse2) masked, while the dP^T MMAs run: float i of thread t is key 16 w + l / 4 + 8 ((i / 2) % 2)
//      of the warpgroup and gathered row 8 (i / 4) + 2 (l % 4) + i % 2 (the wgmma accumulator layout), so the row
//      records are read per column pair, and the mask is the "block" variant's one compare of the row's last
//      visible key.
//   3. dV += P^T dO (issued at once), then dS = P o (dP - D) while those MMAs run, then dK += dS^T Q: m64n64k16
//      with A from registers (floats 8 s .. 8 s + 7 of a 64 x 64 accumulator are the A fragment of its K columns
//      16 s .. 16 s + 15: wgmma_pack_a, no shuffle), B = dO (Q) as stored: rows x d with d contiguous is MN-major
//      for a product whose K is the rows (imm-trans-b = 1, wgmma_desc_sw128_mn), two n64 halves of d: 16 MMAs.
//   4. dQ = scale dS K: dS^T goes to shared memory as stored ([key][row], rows contiguous: the MN-major layout of
//      A = dS), both warpgroups meet at a named barrier, then warpgroup g computes columns 64 g .. 64 g + 63 of
//      the tile's 64 dQ rows over all 128 keys (m64n64k16, A = dS and B = K both MN-major, 8 k-steps); atomic
//      mode stages them in shared memory with their rows' offsets in dq_acc and hands them to the third, dQ
//      warpgroup (wg_dq_reductions), which adds each 256-byte row by one bulk reduction, so the computing
//      warpgroups issue no reduction instruction; the _dq16 kernels (bwd_wgmma_dq16) do the same into a dQ of the
//      input type (rows staged as 16-bit values, 128-byte bulk reductions .add.noftz.bf16 / .f16, each sum
//      rounded); the deterministic modes write the slot partials as the other variants do (the dQ warpgroup then
//      returns at once).
// Against the mma.sync "block" variant: the same 5 products of 2 x 64 x 128 x 128 FLOP per tile (10.5 MFLOP), but
// each warpgroup MMA reads its shared operands once per warpgroup instead of once per warp (ldmatrix), and P, dS
// never go through shared memory for dV and dK. Bytes per tile: the Q and dO rows gathered, 2 x 64 x 256 = 32 KB
// (K and V once per CTA), dQ 64 x 128 x 4 = 32 KB of fp32 atomics: 160 FLOP per byte of global traffic (16 KB of
// 16-bit ones in the _dq16 kernels: 213 FLOP per byte). At the SM's dense bf16 rate (~4 KFLOP per clock) a tile's
// MMAs take ~1.4 us.
// The atomics' bytes are what a long sequence's launch waits for: a row's Q and dO are gathered and its dQ row
// read-modified-written once per slot, at random over the chunk's rows (two heads of 512K queries: 1 GB of Q, dO and
// fp32 dQ, against a 50 MB L2). Nsight Compute of one 512K launch (H100, 2026-12-06, 8.4 M pairs, as a 64K launch):
// 5.12 ms against 3.35 at 64K, DRAM 71% of peak (8.0 GB read, 4.2 GB written) against 47%, L2 hit rate 35% against
// 68%. With dQ accumulated in the input type (half the read-modify-write bytes, no fp32 dQ to zero and cast
// afterwards) the 512K backward's main kernels took 53.3 against 80.5 ms, the whole 512K step 166.9 against 195.6 ms
// (1.17x), 64K 1.05x, 8K 1.13x (H100, interleaved).
// Registers per thread: dK and dV 128 floats, S^T and dP^T 64, then the packed P^T / dS^T fragments 32 and dQ 32
// (253-255 registers, no spills, as two warpgroups alone); with the dQ warpgroup the launch gives 168 a thread
// (384 threads, one CTA per SM) and setmaxnreg re-allocates them: 240 for each computing warpgroup, 24 for the dQ
// warpgroup (2 x 128 x 240 + 128 x 24 <= 65536); no spills.
// Shared memory: K, V 128 x 128 each, 3 x Q, 3 x dO 64 x 128 (the gather three deep, below), dS^T 128 x 64
// (16-bit), two warpgroups' 64 staged dQ rows of 288 bytes, 5 x 64 row records and their pairs, and 1 KB to align
// the swizzle patterns: 220.5 KB (one CTA per SM), and 3 KB of static shared memory (pair indices, staged rows'
// offsets). Head dim 128, block sizes that are multiples of 128 (the "block" variant's shapes).
// Measured on an H200 (batch 2, 16 heads, B 128, k 8, causal; RESULTS.md): the backward op 1.33x faster than
// "block" at 16K. Nsight Compute at 16K, first form (one commit group for S^T and dP^T, two gathered tiles, 8-byte
// atomics from registers): tensor pipe 30%, stalls on the gather's landing (long_scoreboard), the atomics' issue
// queue (lg_throttle) and the MMA waits; with the overlap and the three-deep gather (and bulk reductions, since
// replaced by the staged atomics): 32%, the MMA waits and the barriers between the warpgroups first.
// Where a 64K launch's time goes now (H200, 2026-12-04): Nsight Compute puts it at 38% tensor-pipe activity, DRAM 19%
// of peak (0.92 TB/s), L1/TEX 62%, L2 hit rate 70%, 2 warps per scheduler of which 0.55 eligible (a warp issues every
// 4.9 cycles; top stalls: fixed-latency waits, then short_scoreboard). Timing probes of the whole backward op
// (temporary build options, wrong gradients, 16K / 64K): without the dQ atomics' red instructions (staging kept)
// 1.12x / 1.14x faster, without the Q / dO gathers 1.06x, both 1.21x / 1.23x, without the dV and dK MMAs
// 1.11x / 1.12x. So the reductions cost ~14%, and neither DRAM nor their issue is what limits them: issuing each tile's
// S^T and dP^T before the previous tile's atomics (the loop rotated so that an issue and its waits stay in one
// iteration: with the MMAs in flight across the loop's back edge ptxas serialised every wgmma, C7514 / C7515; a
// sixth row-record buffer kept the tile's records) measured equal (main kernel 64K 7.86-7.89 against 7.81-7.82 ms,
// 512K 64.1-65.6 against 64.6-65.0; backward GPU tests passed) and was not kept. The reductions issued by the dQ
// warpgroup instead (H200, 2026-12-05): main kernel 1.096x faster at 64K (7.18 against 7.86 ms), 1.085x at 8K,
// ~1.06x at 512K. The same warpgroup also gathering Q / dO (mbarrier stages) measured 7.84 ms at 64K: not kept. Nor
// was it finishing dQ in the kernel (per-row pair counts set by the delta launch, decremented by an acquire-release
// atomic once a tile's reductions had completed, the last decrement's thread casting the row from L2) in place of the
// cast after the kernels: 0.64x at 64K on an H100, 0.45x on an H200 with the decrements on 64 threads of their own
// (2026-12-05): each decrement is a full memory barrier and an L2 round trip, which at 24 registers a thread cannot
// be kept in flight for several tiles, so they paced the staging's hand-back.
// The tile loop's serial path, shortened (nvcc 13.0; static instructions of the loop 1520 -> 1327; default build,
// no spills): MOBA_BWD_WG_DQ_NEXT=2 (a loop of its own) issues a tile's dQ MMAs at the start of the next tile,
// before its S^T, so neither the dS barrier between the warpgroups nor the dQ MMAs and staging sit between a tile's
// dK MMAs and the next tile's S^T; MOBA_BWD_WG_STEP_DESC builds each tile's descriptors once and steps them
// (wgmma_desc_plus) from a warp-uniform warpgroup index, so they live in uniform registers (~4 instructions between
// two wgmma instead of ~10); MOBA_BWD_WG_FULL_TILES lets a warp whose 16 keys every row of a full tile sees (most
// tiles of a causal segment: all but the diagonal block's rows) compute P without the mask (~80 instead of ~250
// instructions). Timed on an H100 (2026-12-05, whole backward call, interleaved, against the build with all three
// 0): 64K 1.061-1.062x, 8K 1.015x, 512K 1.001x; without STEP_DESC 0.99-0.993x, DQ_NEXT=1 (the rows staged while the
// next S^T runs) 1.027x. Build options kept for measuring (same results, bit-identical in the deterministic mode,
// checked by the host emulation): the three above at 0 (DQ_NEXT=0: the serial loop), DQ_NEXT=1, and two that
// measured no faster: MOBA_BWD_WG_LATE_GATHER (the next tiles' gathers after the tile's S^T / dP^T MMAs; serial
// loop) 0.989x at 64K, MOBA_BWD_WG_EARLY_LSE (the rows' lse read before the wait for S^T) 0.98x of DQ_NEXT=1's.

#ifndef MOBALAB_ATTENTION_BWD_WGMMA_CUH
#define MOBALAB_ATTENTION_BWD_WGMMA_CUH

#include "attention_bwd.cuh"
#include "wgmma.cuh"
#include "mbarrier.cuh"

#define MOBA_BWD_WG_KEYS 128          // keys per CTA
#define MOBA_BWD_WG_CONSUMERS 256     // the two computing warpgroups
#define MOBA_BWD_WG_THREADS 384       // and the dQ warpgroup
// setmaxnreg: what a warpgroup gives up (dec) is all the others can take (inc), so the counts must fit in the CTA's
// launch allocation of 384 x 168 (with the dQ warpgroup at 32 the computing warpgroups' inc waited forever on an
// H200); at 232 the computing warpgroups spill
#define MOBA_BWD_WG_CONSUMER_REGS 240
#define MOBA_BWD_WG_DQ_REGS 24
#define MOBA_BWD_WG_DS_BARRIER 1     // named barrier: both warpgroups' dS^T stored
#define MOBA_BWD_WG_DQ_EMPTY 2       // named barriers 2, 3: warpgroup 0/1 staged dQ rows read by the bulk copies
#define MOBA_BWD_WG_DQ_FULL 4        // named barriers 4, 5: warpgroup 0's / 1's dQ rows staged
#define MOBA_BWD_WG_CTA_BARRIER 6    // the computing warpgroups' CTA-wide barrier (the dQ warpgroup keeps out of it)
#ifndef MOBA_BWD_WG_LATE_GATHER
#define MOBA_BWD_WG_LATE_GATHER 0   // 1: the next tiles' gathers issued after the tile's S^T / dP^T MMAs
#endif
#ifndef MOBA_BWD_WG_EARLY_LSE
#define MOBA_BWD_WG_EARLY_LSE 0     // 1: the rows' lse2 read before the wait for S^T
#endif
#ifndef MOBA_BWD_WG_FULL_TILES
#define MOBA_BWD_WG_FULL_TILES 1    // warps whose keys every row of the tile sees skip the mask
#endif
#ifndef MOBA_BWD_WG_DQ_NEXT
#define MOBA_BWD_WG_DQ_NEXT 2       // a tile's dQ MMAs at the next tile's start (2: before its S^T, 1: after)
#endif
#ifndef MOBA_BWD_WG_STEP_DESC
#define MOBA_BWD_WG_STEP_DESC 1     // descriptors built once per tile and stepped, from a warp-uniform wg
#endif
#define MOBA_BWD_WG_DQ_READ 7        // named barriers 7, 8 (MOBA_BWD_WG_DQ_NEXT): warpgroup 0's / 1's dS^T free
#define MOBA_BWD_WG_DQ_PITCH 288     // bytes per staged dQ row: 64 floats + 32 (conflict-free float2 stores)
#define MOBA_BWD_WG_DQ_PITCH16 144   // the same for 16-bit dQ rows: 64 values + 16 (conflict-free 4-byte stores)

namespace moba_bwd {

// The wgmma layout of a ROWS x 128 tile (wgmma.cuh: two 64-column blocks of 128-byte rows, chunks XOR-swizzled by
// row % 8), and the async-proxy fence a thread's landed copies need before a barrier hands them to wgmma.
struct Sw128Tile {
  // rows 8 apart have the same swizzle: gather_tile steps a thread's copies by a constant (with STEP_DESC)
  static constexpr bool kRowStep = MOBA_BWD_WG_STEP_DESC;
  static constexpr unsigned kRowBytes = moba::SW128_ROW_BYTES;
  template <int ROWS>
  __device__ static __forceinline__ unsigned at(int row, int ch) { return moba::sw128_offset(row, ch * 8, ROWS); }
  __device__ static __forceinline__ void landed() {
#if MOBA_HAS_WGMMA
    moba::fence_proxy_async_shared();
#endif
  }
  // the CTA's barrier between tiles, over the computing warpgroups only
  __device__ static __forceinline__ void sync() { moba::bar_sync(MOBA_BWD_WG_CTA_BARRIER, MOBA_BWD_WG_CONSUMERS); }
};

// The gathered tiles run three deep (TilePipe, attention_bwd.cuh): while tile ti is computed, the Q and dO rows of
// tiles ti + 1 and ti + 2 are in flight, their row records built one tile before them (wg_prefetch). With two
// buffers the gather's landing was 12% of the stall samples (Nsight Compute at 16K on an H200: the wait before the
// tile's barrier); three made the backward op 1.01-1.03x faster (8K-64K, interleaved on an H200).
constexpr int kWgStages = 3;
constexpr int kWgLead = TilePipe<kWgStages>::LEAD;    // tiles whose gathers are in flight ahead of the current one
constexpr int kWgInfos = TilePipe<kWgStages>::INFOS;  // row-record buffers

// The row records from the pairs. The kernel builds each tile's records itself, from the chunk's sorted list and
// the delta launch's head-major (lse2, D) (no row-record launch: at 512K that launch moved ~3.2 GB a step, 1.48 ms
// on an H100): pair p = (hc n_q + tt) top_k + slot is query t0 + tt of head hc, and its RowStat follows from them.
// Thread r < 64 of the first warpgroup builds row r of a tile three tiles before the tile is computed (one tile
// before its gather, which reads t and hc after the next CTA barrier): t and hc stored, the RowStat copied (8 bytes,
// landing with the gathers of that tile's commit group). Its pair was copied two tiles before that (a ring of
// kWgInfos pairs per row), so no thread waits for a load it issued in the same tile.
struct PairRows {
  const long long* pairs;  // the chunk's sorted list (at w.first: the segment's)
  const RowStat* stats;    // (batch, heads, seqlen) head-major
  int top_k, n_q, t0, heads, h0, seqlen, batch_index;
};

// Row r (thread r < 64) of a tile's records from its pair p (ok: r < the tile's rows; else t = hc = 0 and the stats
// zero-filled, as the row-record launch's zero-filled records were).
__device__ __forceinline__ void wg_row_record(RowInfo* info, unsigned info_u, long long p, bool ok, const PairRows& pr,
                                              int r) {
  int t = 0, hc = 0;
  const RowStat* src = pr.stats;  // a valid address: not read when the copy zero-fills
  if (ok) {
    // a chunk holds < 2^31 pairs (its scratch is bounded by the budget)
    int tt;
    moba::pair_query_head(p, pr.top_k, pr.n_q, tt, hc);
    t = pr.t0 + tt;
    src += stat_index(pr.batch_index, pr.h0 + hc, t, pr.seqlen, pr.heads);
  }
  info[r].t = t;
  info[r].hc = hc;
  moba::cp_async8(info_u + r * 16, src, ok ? 8 : 0);  // lse2, delta
}

// Row r's pair of a tile into the pair ring (zero-filled past the tile's rows).
__device__ __forceinline__ void wg_load_pair(unsigned dst, const long long* pairs, long long first, int count, int r) {
  const bool ok = r < count;
  moba::cp_async8(dst + r * 8, pairs + (ok ? first + r : 0), ok ? 8 : 0);
}

// A CTA's start: the records of tiles 0 .. kWgLead from their pairs read here, the pairs of tiles kWgLead + 1 ..
// 2 kWgLead copied into the ring, then K and V (may land later); after the barrier that publishes the records'
// t and hc, the gathers of tiles 0 .. kWgLead - 1, one group per gather.
template <int D, int KEYS, int NTHREADS>
__device__ __forceinline__ void wg_start_segment(unsigned sK, unsigned sV, unsigned sQ, unsigned sdO, unsigned sInfoU,
                                                 RowInfo* sInfo, unsigned sPairU, const void* k_, const void* v_,
                                                 const char* qb, const char* gb, const PairRows& pr, const CtaWork& w,
                                                 int kv_heads, int tid) {
  constexpr unsigned TILE_BYTES = moba::sw128_tile_bytes(MOBA_BWD_ROWS, D);
  if (tid < MOBA_BWD_ROWS) {
    long long p[kWgLead + 1];
#pragma unroll
    for (int t = 0; t <= kWgLead; ++t)  // the loads first, all in flight
      p[t] = t < w.n_tiles && tid < tile_rows(w.n_rows, t)
                 ? pr.pairs[w.first + static_cast<long long>(t) * MOBA_BWD_ROWS + tid] : 0;
#pragma unroll
    for (int t = 0; t <= kWgLead; ++t)
      if (t < w.n_tiles)
        wg_row_record(sInfo + t * MOBA_BWD_ROWS, sInfoU + t * MOBA_BWD_ROWS * 16, p[t], tid < tile_rows(w.n_rows, t),
                      pr, tid);
#pragma unroll
    for (int t = kWgLead + 1; t <= 2 * kWgLead; ++t)
      if (t < w.n_tiles)
        wg_load_pair(sPairU + t * MOBA_BWD_ROWS * 8, pr.pairs, w.first + static_cast<long long>(t) * MOBA_BWD_ROWS,
                     tile_rows(w.n_rows, t), tid);
  }
  cp_async_commit();
  load_kv<D, KEYS, NTHREADS, Sw128Tile>(sK, sV, k_, v_, w, kv_heads, tid);
  cp_async_commit();
  Sw128Tile::sync();  // the records' t and hc (the gathers' addresses)
#pragma unroll
  for (int t = 0; t < kWgLead; ++t) {
    if (t < w.n_tiles)
      gather_tile<D, NTHREADS, Sw128Tile>(sQ + t * TILE_BYTES, sdO + t * TILE_BYTES, qb, gb,
                                          sInfo + t * MOBA_BWD_ROWS, tile_rows(w.n_rows, t), w.row_base, pr.heads,
                                          pr.h0, tid);
    cp_async_commit();
  }
}

// During tile ti (after its CTA barrier): the gather of tile ti + kWgLead, the records of tile ti + kWgLead + 1
// (their pairs landed: copied two tiles ago or at the start) into the buffer of tile ti - 2 (read before the last
// barrier), and the pairs of tile ti + 2 kWgLead + 1 into the ring slot of tile ti (built three tiles ago); one group.
template <int D, int NTHREADS>
__device__ __forceinline__ void wg_prefetch(unsigned sQ, unsigned sdO, unsigned sInfoU, RowInfo* sInfo,
                                            unsigned sPairU, const long long* sPair, const char* qb, const char* gb,
                                            const PairRows& pr, const CtaWork& w, int ti, int tid) {
  constexpr unsigned TILE_BYTES = moba::sw128_tile_bytes(MOBA_BWD_ROWS, D);
  const int tg = ti + kWgLead, tr = ti + kWgLead + 1, tp = ti + 2 * kWgLead + 1;
  if (tg < w.n_tiles)
    gather_tile<D, NTHREADS, Sw128Tile>(sQ + (tg % kWgStages) * TILE_BYTES, sdO + (tg % kWgStages) * TILE_BYTES, qb,
                                        gb, sInfo + (tg % kWgInfos) * MOBA_BWD_ROWS, tile_rows(w.n_rows, tg),
                                        w.row_base, pr.heads, pr.h0, tid);
  if (tid < MOBA_BWD_ROWS) {
    if (tr < w.n_tiles)
      wg_row_record(sInfo + (tr % kWgInfos) * MOBA_BWD_ROWS, sInfoU + (tr % kWgInfos) * MOBA_BWD_ROWS * 16,
                    sPair[(tr % kWgInfos) * MOBA_BWD_ROWS + tid], tid < tile_rows(w.n_rows, tr), pr, tid);
    if (tp < w.n_tiles)
      wg_load_pair(sPairU + (tp % kWgInfos) * MOBA_BWD_ROWS * 8, pr.pairs,
                   w.first + static_cast<long long>(tp) * MOBA_BWD_ROWS, tile_rows(w.n_rows, tp), tid);
  }
  cp_async_commit();
}

// Descriptors of k-step ks of a K-major (wg_desc_k) or MN-major (wg_desc_mn) swizzled tile: built at each k-step, or
// with MOBA_BWD_WG_STEP_DESC built once and stepped by a constant (wgmma_desc_plus: one add instead of masks and
// shifts per wgmma; wgmma.cuh asserts that both are equal).
__device__ __forceinline__ unsigned long long wg_desc_k(unsigned tile, int ks, unsigned rows) {
  using namespace moba;
  return MOBA_BWD_WG_STEP_DESC ? wgmma_desc_plus(wgmma_desc_sw128(tile, 0, rows), sw128_offset(0, 16 * ks, rows))
                               : wgmma_desc_sw128(tile, ks, rows);
}
__device__ __forceinline__ unsigned long long wg_desc_mn(unsigned tile, int ks, unsigned k_rows, unsigned n) {
  using namespace moba;
  return MOBA_BWD_WG_STEP_DESC
             ? wgmma_desc_plus(wgmma_desc_sw128_mn(tile, 0, k_rows, n), sw128_offset(16 * ks, 0, k_rows))
             : wgmma_desc_sw128_mn(tile, ks, k_rows, n);
}

// acc (a warpgroup's 64 keys x 128 columns, two n64 halves) += X^T B over a tile's 64 gathered rows, one commit
// group: X^T is this warpgroup's 64 x 64 accumulator x (keys x rows: P^T or dS^T) as the register A operand,
// rounded to T; B is the tile at shared address sb as gathered (rows x d, d contiguous: MN-major for a product whose
// K is the rows), read with imm-trans-b. a holds the packed A fragments: the caller's, untouched until the group
// has been waited for.
template <typename T>
__device__ __forceinline__ void wg_add_rows_product(float (&acc)[2][32], const float (&x)[32], unsigned (&a)[4][4],
                                                    unsigned sb) {
#if MOBA_HAS_WGMMA
  using namespace moba;
  constexpr unsigned HALF = MOBA_BWD_ROWS * SW128_ROW_BYTES;  // second 64-column block of a tile
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_pack_a<T>(x + 8 * ks, a[ks]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wgmma_rs<T, 1>(acc[c], a[ks], wg_desc_mn(sb + c * HALF, ks, MOBA_BWD_ROWS, 64), 1);
  wgmma_commit_group();
#endif
}

// The dQ warpgroup (atomic dQ mode): thread p adds row p % 64 of warpgroup p / 64's staged dQ rows (64 fp32 columns,
// 256 bytes) to its dQ accumulator row by one bulk reduction, tile after tile, so that the computing warpgroups
// issue no reduction instruction. A tile's rows are handed over by the two "full" barriers (the computing warpgroup
// arrives once its rows and their dQ offsets are staged) and handed back by the "empty" ones once the copy engine
// has read them; s_off holds each staged row's element offset in dq_acc (-1: a row past the tile's end), tile ti's in
// buffer ti % 2 of two with MOBA_BWD_WG_DQ_NEXT.
template <typename T, bool kDq16>
__device__ __forceinline__ void wg_dq_reductions(float* dq_acc, unsigned sDQ, const long long* s_off, int n_tiles,
                                                 int p) {
#if MOBA_HAS_WGMMA
  using namespace moba;
  static_assert(128 * MOBA_BWD_WG_DQ_REGS + MOBA_BWD_WG_CONSUMERS * MOBA_BWD_WG_CONSUMER_REGS <=
                    MOBA_BWD_WG_THREADS * 168,
                "setmaxnreg counts beyond the launch's 384 x 168 registers");
  const int g = p >> 6;
  const unsigned src = sDQ + g * (MOBA_BWD_ROWS * MOBA_BWD_WG_DQ_PITCH) +
                       (p & 63) * (kDq16 ? MOBA_BWD_WG_DQ_PITCH16 : MOBA_BWD_WG_DQ_PITCH);
  // one hand-back per tile (the first: the staging areas start empty), none left unmatched at the CTA's end
  for (int ti = 0; ti < n_tiles; ++ti) {
    if (ti > 0) bulk_wait_group_read<0>();
    bar_arrive(MOBA_BWD_WG_DQ_EMPTY, 256);
    bar_arrive(MOBA_BWD_WG_DQ_EMPTY + 1, 256);
    bar_sync(MOBA_BWD_WG_DQ_FULL, 256);
    bar_sync(MOBA_BWD_WG_DQ_FULL + 1, 256);
    const long long off = s_off[(MOBA_BWD_WG_DQ_NEXT ? (ti & 1) * 2 * MOBA_BWD_ROWS : 0) + p];
    if constexpr (kDq16) {
      if (off >= 0) bulk_reduce_add_16(reinterpret_cast<T*>(dq_acc) + off, src, 64 * 2);
    } else {
      if (off >= 0) bulk_reduce_add_f32(dq_acc + off, src, 64 * 4);
    }
    bulk_commit_group();
  }
  bulk_wait_group<0>();
#endif
}

template <typename T, int D, bool kDq16 = false>
__device__ __forceinline__ void bwd_wgmma(const void* q_, const void* k_, const void* v_, const void* dout_,
                                          const void* stats, const long long* pairs, const long long* seg_off,
                                          const int* seg_order, float* dq_acc, float* part_dq, void* dk_, void* dv_,
                                          float* dk_acc, float* dv_acc, int seqlen, int heads, int kv_heads, int block_size,
                                          int n_blocks, int batch_index, int h0, int n_seg, int causal, float scale,
                                          float scale_log2, int sub0, int n_sub_launch, int dq_mode, int dkv_mode,
                                          int top_k, int n_q, int t0) {
  static_assert(D == 128, "the wgmma backward has head dim 128");
#if MOBA_HAS_WGMMA
  using namespace moba;
  constexpr int NTHREADS = MOBA_BWD_WG_CONSUMERS;  // the computing warpgroups; the dQ warpgroup returns at once
  constexpr int KEYS = MOBA_BWD_WG_KEYS;
  constexpr int ROWS = MOBA_BWD_ROWS;
  constexpr unsigned KV_BYTES = sw128_tile_bytes(KEYS, D);   // 32 KB
  constexpr unsigned TILE_BYTES = sw128_tile_bytes(ROWS, D);  // 16 KB
  constexpr unsigned DS_BYTES = sw128_tile_bytes(KEYS, ROWS);  // dS^T: 128 keys x 64 rows
  constexpr unsigned DQ_BYTES = ROWS * MOBA_BWD_WG_DQ_PITCH;   // one warpgroup's staged dQ rows
  MOBA_DYNAMIC_SMEM(smem);
  const unsigned raw = smem_u32(smem);
  const unsigned sK = (raw + SW128_PATTERN_BYTES - 1) & ~(SW128_PATTERN_BYTES - 1);  // the launch adds 1 KB
  const unsigned sV = sK + KV_BYTES;
  const unsigned sQ = sV + KV_BYTES;                  // kWgStages buffers
  const unsigned sdO = sQ + kWgStages * TILE_BYTES;   // kWgStages buffers
  const unsigned sdS = sdO + kWgStages * TILE_BYTES;  // dS^T [key][row]
  const unsigned sDQ = sdS + DS_BYTES;                // 2 x 64 staged dQ rows (atomic mode)
  unsigned char* info_base = smem + (sDQ + 2 * DQ_BYTES - raw);  // kWgInfos x 64 RowInfo
  RowInfo* sInfo = reinterpret_cast<RowInfo*>(info_base);
  const unsigned sInfoU = smem_u32(info_base);
  unsigned char* pair_base = info_base + kWgInfos * ROWS * sizeof(RowInfo);  // kWgInfos x 64 pairs (the ring)
  const long long* sPair = reinterpret_cast<const long long*>(pair_base);
  const unsigned sPairU = smem_u32(pair_base);
  const PairRows pr{pairs, static_cast<const RowStat*>(stats), top_k, n_q, t0, heads, h0, seqlen, batch_index};
  __shared__ long long s_pair[(MOBA_BWD_WG_DQ_NEXT ? 2 : 1) * ROWS];  // deterministic modes: a tile's pair indices
  // the staged dQ rows' offsets in dq_acc, warpgroup by warpgroup (a tile's written at its end with DQ_NEXT: two)
  __shared__ long long s_dq_off[(MOBA_BWD_WG_DQ_NEXT ? 2 : 1) * 2 * ROWS];

  // STEP_DESC: wg through a shuffle from lane 0, so that ptxas knows it is warp-uniform and keeps the shared addresses
  // and descriptors derived from it in uniform registers (as the wgmma forward does)
  const int tid = threadIdx.x, wg = MOBA_BWD_WG_STEP_DESC ? __shfl_sync(0xffffffffu, tid >> 7, 0) : tid >> 7,
            wt = tid & 127, lane = tid & 31, w4 = (tid >> 5) & 3;
  const int g = lane >> 2, tq = lane & 3;
  const CtaWork w = cta_work<KEYS>(seg_off, seg_order, seqlen, heads, kv_heads, block_size, n_blocks, batch_index,
                                   h0, n_seg, sub0, n_sub_launch);
  if (!w.ok) return;
  if (wg == 2) {
    setmaxnreg_dec<MOBA_BWD_WG_DQ_REGS>();
    if (dq_mode == 0) wg_dq_reductions<T, kDq16>(dq_acc, sDQ, s_dq_off, w.n_tiles, wt);
    return;
  }
  setmaxnreg_inc<MOBA_BWD_WG_CONSUMER_REGS>();
  const int kvh = w.kvh, key0 = w.key0, key_end = w.key_end;
  const long long row_base = w.row_base;

  const char* qb = static_cast<const char*>(q_);
  const char* gb = static_cast<const char*>(dout_);
  wg_start_segment<D, KEYS, NTHREADS>(sK, sV, sQ, sdO, sInfoU, sInfo, sPairU, k_, v_, qb, gb, pr, w, kv_heads, tid);

  // dK, dV of keys 64 wg + 16 w4 + g (+ 8), columns 64 c + 8 n + 2 tq (+ 1) in float 4 n + e of dk[c] / dv[c]
  float dk[2][32], dv[2][32];
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) dk[c][i] = dv[c][i] = 0.f;
  const int key_a = key0 + 64 * wg + 16 * w4 + g;  // this thread's first key row
  // the warpgroup's 64 keys of K and V as A operands: rows 64 wg .. of each 64-column block
  const unsigned sKg = sK + 64 * wg * SW128_ROW_BYTES, sVg = sV + 64 * wg * SW128_ROW_BYTES;

  // ---- 1. S^T = K_g Q^T and dP^T = V_g dO^T (64 keys x 64 rows each), a commit group each
  auto issue_s = [&](float (&s)[32], unsigned sq) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      wgmma_ss<T>(s, wg_desc_k(sKg, ks, KEYS), wg_desc_k(sq, ks, ROWS), ks > 0);
    wgmma_commit_group();
  };
  auto issue_dp = [&](float (&dp)[32], unsigned sdo) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      wgmma_ss<T>(dp, wg_desc_k(sVg, ks, KEYS), wg_desc_k(sdo, ks, ROWS), ks > 0);
    wgmma_commit_group();
  };

  // ---- 2. P = 2^(x - lse2), masked: element (key 16 w4 + g + 8 h, row 8 n + 2 tq + e) is float 4 n + 2 h + e.
  //         A warp whose 16 keys every row of a full tile sees (the rows past the diagonal block of a causal
  //         segment, most tiles) skips the mask: its lanes' two rows' t against the warp's last key, one vote.
  auto probs = [&](float (&s)[32], const RowInfo* info, int count, const float (&lse2)[16]) {
    bool unmasked = false;
    if (MOBA_BWD_WG_FULL_TILES) {
      const int warp_last = key_a - g + 15;
      const bool lane_sees = count == ROWS && warp_last < key_end &&
                             (!causal || min(info[lane].t, info[lane + 32].t) >= warp_last);
      unmasked = !__any_sync(0xffffffffu, !lane_sees);
    }
    if (unmasked) {
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float lse = MOBA_BWD_WG_EARLY_LSE ? lse2[2 * n + e] : info[8 * n + 2 * tq + e].lse2;
#pragma unroll
          for (int h = 0; h < 2; ++h) s[4 * n + 2 * h + e] = exp2f(s[4 * n + 2 * h + e] * scale_log2 - lse);
        }
    } else {
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 8 * n + 2 * tq + e;
          const RowInfo ri = info[r];
          // the row's last visible key, relative to key_a: one compare per element against a constant
          const int last = r < count ? (causal ? min(ri.t, key_end - 1) : key_end - 1) - key_a : -1;
          const float lse = MOBA_BWD_WG_EARLY_LSE ? lse2[2 * n + e] : ri.lse2;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int i = 4 * n + 2 * h + e;
            const float x = s[i] * scale_log2 - lse;  // finite: a select, not an add, masks it
            s[i] = exp2f(8 * h <= last ? x : __int_as_float(0xff800000u));
          }
        }
    }
  };

  // P once S^T has landed; the row records' lse2 read before the wait with EARLY_LSE (else each exponent waits for
  // its record's read)
  auto wait_s_probs = [&](float (&s)[32], const RowInfo* info, int count) {
    float lse2[16];
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (MOBA_BWD_WG_EARLY_LSE) lse2[i] = info[8 * (i / 2) + 2 * tq + i % 2].lse2;
    wgmma_wait_group<1>();  // S^T
    wgmma_fence_operand(s);
    probs(s, info, count, lse2);
  };
  // the gather of tile ti + 2, the records of tile ti + 3 and the pairs of tile ti + 5 (wg_prefetch)
  auto prefetch = [&](int ti) {
    wg_prefetch<D, NTHREADS>(sQ, sdO, sInfoU, sInfo, sPairU, sPair, qb, gb, pr, w, ti, tid);
  };

  // ---- 3. dS = P o (dP - D) for the 8 rows 8 n ..; its dS^T to shared memory for dQ (pairs of adjacent rows: one
  //         32-bit store)
  auto form_ds = [&](float (&dp)[32], const float (&s)[32], const RowInfo* info, int n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float delta = info[8 * n + 2 * tq + e].delta;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 4 * n + 2 * h + e;
        dp[i] = s[i] * (dp[i] - delta);
      }
    }
  };
  // (STEP_DESC: row kr's 16-byte chunk n sits at chunk n ^ (kr % 8) = n ^ g of its 128 bytes, and sdS is 1024-byte
  // aligned, so the address is the chunk-0 one XOR n << 4: one instruction a store, nothing kept across the loop)
  auto store_ds = [&](const float (&dp)[32], int n) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kr = 64 * wg + 16 * w4 + g + 8 * h;
      const unsigned at = MOBA_BWD_WG_STEP_DESC ? (sdS + sw128_offset(kr, 2 * tq, KEYS)) ^ (n << 4)
                                                : sdS + sw128_offset(kr, 8 * n + 2 * tq, KEYS);
      st_shared_b32(at, Elem<T>::pack(dp[4 * n + 2 * h], dp[4 * n + 2 * h + 1]));
    }
  };

  // ---- 4. dQ = scale dS K: rows 0 .. 63, columns 64 wg .. 64 wg + 63, over the 128 keys (both warpgroups' dS^T)
  auto issue_dq = [&](float (&dq)[32]) {
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk)
      wgmma_ss_t<T, 1, 1>(dq, wg_desc_mn(sdS, kk, KEYS, 64),
                          wg_desc_mn(sK + wg * KEYS * SW128_ROW_BYTES, kk, KEYS, 64), kk > 0);
    wgmma_commit_group();
  };
  // element offset in dq_acc of the dQ row that thread wt < 64 stages (-1: a row past the tile's end)
  auto dq_row_off = [&](const RowInfo* info, int count) -> long long {
    const RowInfo ri = info[wt];
    return wt < count ? ((row_base + ri.t) * heads + (h0 + ri.hc)) * D + 64 * wg : -1;
  };
  // Atomic mode: the warpgroup stages its 64 x 64 part of a tile's dQ (scaled) and the rows' offsets in shared memory
  // for the dQ warpgroup's bulk reductions (wg_dq_reductions); the offsets from the tile's records (info, count), or
  // with DQ_NEXT written at the tile's end already (info unused). Measured on an H200 (main kernel, 2026-12-05):
  // 1.096x faster at 64K than 16-byte vector atomics from these warpgroups (which had been 1.02-1.03x faster than
  // 8-byte atomics from the accumulators and 1.07-1.08x faster than a bulk reduction per row issued here, whose
  // per-thread addresses the compiler issues one thread at a time).
  auto stage_dq = [&](const float (&dq)[32], const RowInfo* info, int count) {
    const int r0 = 16 * w4 + g;  // this thread's accumulator rows r0 and r0 + 8
    const unsigned sdq = sDQ + wg * DQ_BYTES;
    bar_sync(MOBA_BWD_WG_DQ_EMPTY + wg, 256);  // the copy engine has read the previous tile's rows
    // rows r0 and r0 + 8 at a0 and a1, 8 columns a step (fp32 or 16-bit values: kDq16)
    constexpr unsigned pitch = kDq16 ? MOBA_BWD_WG_DQ_PITCH16 : MOBA_BWD_WG_DQ_PITCH;
    constexpr unsigned step = kDq16 ? 16 : 32;  // bytes per 8 columns
    const unsigned a0 = sdq + r0 * pitch + tq * (step / 4), a1 = a0 + 8 * pitch;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float x0 = dq[4 * n] * scale, x1 = dq[4 * n + 1] * scale;
      const float y0 = dq[4 * n + 2] * scale, y1 = dq[4 * n + 3] * scale;
      if constexpr (kDq16) {
        st_shared_b32(a0 + n * step, wgmma_pack2(wgmma_ab<T>{}, x0, x1));
        st_shared_b32(a1 + n * step, wgmma_pack2(wgmma_ab<T>{}, y0, y1));
      } else {
        st_shared_v2_f32(a0 + n * step, x0, x1);
        st_shared_v2_f32(a1 + n * step, y0, y1);
      }
    }
    if (!MOBA_BWD_WG_DQ_NEXT && wt < ROWS) s_dq_off[wg * ROWS + wt] = dq_row_off(info, count);
    fence_proxy_async_shared();  // the staged rows -> the copy engine's reads
    bar_arrive(MOBA_BWD_WG_DQ_FULL + wg, 256);
  };

  // the deterministic modes: a tile's dQ rows stored into or added to their slot partials from the registers
  auto add_dq_rows = [&](const float (&dq)[32], const RowInfo* info, const long long* pair, int count) {
    const int r0 = 16 * w4 + g, r1 = r0 + 8;
    const bool has0 = r0 < count, has1 = r1 < count;
    const int col0 = 64 * wg + 2 * tq;
    add_dq<8>(part_dq + dq_row_offset<D>(info, pair, r0, has0, row_base, heads, h0, dq_mode) + col0,
              part_dq + dq_row_offset<D>(info, pair, r1, has1, row_base, heads, h0, dq_mode) + col0, has0, has1,
              reinterpret_cast<const float(&)[8][4]>(dq), scale, dq_mode);
  };

  if (MOBA_BWD_WG_DQ_NEXT) {
    // A tile's dQ MMAs issued at the start of the next tile, before its S^T / dP^T, and its rows staged while those
    // run: no barrier between the warpgroups inside a tile (the CTA barrier of the next tile orders both warpgroups'
    // dS^T stores before the dQ MMAs that read them), and the dQ MMAs and staging off the tile's serial path. The one
    // dS^T buffer: a warpgroup stores tile ti's only after the other's MMAs of tile ti - 1's dQ are complete (named
    // barrier MOBA_BWD_WG_DQ_READ + its index: the other warpgroup arrives, it waits).
    // Tile 0's dQ MMAs are issued too (on whatever the dS^T buffer holds, not staged): a wgmma issued on one path
    // only makes ptxas serialise every wgmma of the kernel (C7514).
    // The deterministic modes keep the previous tile's pair indices (s_pair, two buffers) and row count for it.
    int count_prev = 0;
    for (int ti = 0; ti < w.n_tiles; ++ti) {
      const int count = begin_tile<D, NTHREADS, Sw128Tile, kWgStages, false>(
          sQ, sdO, sInfoU, sInfo, qb, gb, nullptr, w, ti, heads, h0, pairs, s_pair + (ti & 1) * ROWS, dq_mode, tid);
      const RowInfo* info = sInfo + (ti % kWgInfos) * ROWS;
      const unsigned sq = sQ + (ti % kWgStages) * TILE_BYTES;
      const unsigned sdo = sdO + (ti % kWgStages) * TILE_BYTES;
      // tile ti - 1's dQ, then S^T; dP^T once the dQ rows are staged (dQ, S^T and dP^T accumulators with dK and dV
      // in flight at once would need 224 registers: ptxas serialises the wgmma, C7512)
      float s[32], dp[32];
      {
        float dq[32];
        wgmma_fence();
        issue_dq(dq);
        if (MOBA_BWD_WG_DQ_NEXT == 1) issue_s(s, sq);
        wgmma_wait_group<MOBA_BWD_WG_DQ_NEXT == 1 ? 1 : 0>();  // tile ti - 1's dQ
        wgmma_fence_operand(dq);
        bar_arrive(MOBA_BWD_WG_DQ_READ + 1 - wg, NTHREADS);  // this warpgroup's reads of dS^T are done
        if (ti > 0 && dq_mode == 0) stage_dq(dq, nullptr, 0);
        if (ti > 0 && dq_mode != 0) add_dq_rows(dq, nullptr, s_pair + ((ti - 1) & 1) * ROWS, count_prev);
      }
      // the next tiles' gathers, records and pairs (the records of tile ti + 3 overwrite tile ti - 2's)
      prefetch(ti);
      wgmma_fence();
      if (MOBA_BWD_WG_DQ_NEXT != 1) issue_s(s, sq);
      issue_dp(dp, sdo);
      wait_s_probs(s, info, count);
      unsigned pa[4][4], da[4][4];
      wg_add_rows_product<T>(dv, s, pa, sdo);  // dV += P^T dO
      wgmma_wait_group<1>();                   // dP^T (the dV MMAs may still run)
      wgmma_fence_operand(dp);
#pragma unroll
      for (int n = 0; n < 8; ++n) form_ds(dp, s, info, n);
      bar_sync(MOBA_BWD_WG_DQ_READ + wg, NTHREADS);  // the other warpgroup's dQ MMAs of tile ti - 1 are done
#pragma unroll
      for (int n = 0; n < 8; ++n) store_ds(dp, n);
      fence_proxy_async_shared();  // dS^T stores -> the dQ MMAs after the next CTA barrier
      wg_add_rows_product<T>(dk, dp, da, sq);  // dK += dS^T Q
      // tile ti's dQ rows' offsets, for the dQ warpgroup's reductions after the next tile's staging (its reads of
      // tile ti - 2's offsets in this buffer preceded its hand-back that this tile's staging waited for)
      if (wt < ROWS && dq_mode == 0) s_dq_off[(ti & 1) * 2 * ROWS + wg * ROWS + wt] = dq_row_off(info, count);
      count_prev = count;
      wgmma_wait_group<0>();
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        wgmma_fence_operand(dv[c]);
        wgmma_fence_operand(dk[c]);
      }
    }
    if (w.n_tiles > 0) {  // the last tile's dQ
      Sw128Tile::sync();
      float dq[32];
      wgmma_fence();
      issue_dq(dq);
      wgmma_wait_group<0>();
      wgmma_fence_operand(dq);
      if (dq_mode == 0) stage_dq(dq, nullptr, 0);
      else add_dq_rows(dq, nullptr, s_pair + ((w.n_tiles - 1) & 1) * ROWS, count_prev);
    }
  } else {
    for (int ti = 0; ti < w.n_tiles; ++ti) {
      const int count = begin_tile<D, NTHREADS, Sw128Tile, kWgStages, false>(
          sQ, sdO, sInfoU, sInfo, qb, gb, nullptr, w, ti, heads, h0, pairs, s_pair, dq_mode, tid);
      if (!MOBA_BWD_WG_LATE_GATHER) prefetch(ti);
      const RowInfo* info = sInfo + (ti % kWgInfos) * ROWS;
      const unsigned sq = sQ + (ti % kWgStages) * TILE_BYTES;
      const unsigned sdo = sdO + (ti % kWgStages) * TILE_BYTES;

      // ---- 1. S^T = K_g Q^T, then dP^T = V_g dO^T (64 keys x 64 rows each), two commit groups: P is computed
      //         while the dP^T MMAs run
      float s[32], dp[32];
      wgmma_fence();
      issue_s(s, sq);
      issue_dp(dp, sdo);
      if (MOBA_BWD_WG_LATE_GATHER) prefetch(ti);
      wait_s_probs(s, info, count);
      {
        // dV += P^T dO (4 k-steps over the tile's 64 rows, two n64 halves of d), issued before dS is formed
        unsigned pa[4][4], da[4][4];
        wg_add_rows_product<T>(dv, s, pa, sdo);
        wgmma_wait_group<1>();  // dP^T (the dV MMAs may still run)
        wgmma_fence_operand(dp);
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          form_ds(dp, s, info, n);
          store_ds(dp, n);
        }
        fence_proxy_async_shared();  // dS^T stores -> visible to the other warpgroup's wgmma after the barrier

        wg_add_rows_product<T>(dk, dp, da, sq);  // dK += dS^T Q

        bar_sync(MOBA_BWD_WG_DS_BARRIER, NTHREADS);
        float dq[32];
        issue_dq(dq);
        wgmma_wait_group<0>();
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          wgmma_fence_operand(dv[c]);
          wgmma_fence_operand(dk[c]);
        }
        wgmma_fence_operand(dq);

        if (dq_mode == 0) stage_dq(dq, info, count);
        else add_dq_rows(dq, info, s_pair, count);
      }
      // the next begin_tile's wait + barrier orders these reads (all MMAs complete) before the buffers are rewritten
    }
  }
  cp_async_wait<0>();

  // dK (scaled) and dV: keys key_a (+ 8), columns 64 c + 8 n + 2 tq (+ 1)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = key_a + 8 * h;
    if (key >= key_end) continue;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const long long off = ((row_base + key) * kv_heads + kvh) * D + 64 * c + 2 * tq;
      store_dkv_row<T, 8>(dk_, dv_, dk_acc, dv_acc, off, reinterpret_cast<const float(&)[8][4]>(dk[c]),
                          reinterpret_cast<const float(&)[8][4]>(dv[c]), h, scale, dkv_mode);
    }
  }
#endif
}

// The atomic dQ mode into a dQ of the input type (dq_acc points to T values, dq_mode 0): its own kernels, so that
// neither form carries the other's staging (tested at run time, the staging cost two measurement builds 20 bytes of
// spills beyond their allowance).
template <typename T, int D>
__device__ __forceinline__ void bwd_wgmma_dq16(const void* q_, const void* k_, const void* v_, const void* dout_,
                                               const void* stats, const long long* pairs, const long long* seg_off,
                                               const int* seg_order, float* dq_acc, float* part_dq, void* dk_,
                                               void* dv_, float* dk_acc, float* dv_acc, int seqlen, int heads,
                                               int kv_heads, int block_size, int n_blocks, int batch_index, int h0,
                                               int n_seg, int causal, float scale, float scale_log2, int sub0,
                                               int n_sub_launch, int dq_mode, int dkv_mode, int top_k, int n_q,
                                               int t0) {
  bwd_wgmma<T, D, true>(q_, k_, v_, dout_, stats, pairs, seg_off, seg_order, dq_acc, part_dq, dk_, dv_, dk_acc,
                        dv_acc, seqlen, heads, kv_heads, block_size, n_blocks, batch_index, h0, n_seg, causal, scale,
                        scale_log2, sub0, n_sub_launch, dq_mode, dkv_mode, top_k, n_q, t0);
}

// The wgmma main kernels' entry: the other main kernels' parameters (MOBA_BWD_KERNEL, attention_bwd.cuh) with the
// rows' head-major (lse2, D) from the delta launch where those take the row records, and what a pair's query and
// head follow from (the wgmma kernel builds its records itself: wg_row_record).
#define MOBA_BWD_WG_KERNEL(NAME, BODY, BOUNDS, T, D)                                                                  \
  extern "C" __global__ void __launch_bounds__ BOUNDS NAME(                                                           \
      const void* q, const void* k, const void* v, const void* dout, const void* stats, const long long* pairs,       \
      const long long* seg_off, const int* seg_order, float* dq_acc, float* part_dq, void* dk, void* dv,             \
      float* dk_acc, float* dv_acc, int seqlen, int heads, int kv_heads, int block_size, int n_blocks,               \
      int batch_index, int h0, int n_seg, int causal, float scale, float scale_log2, int sub0, int n_sub_launch,     \
      int dq_mode, int dkv_mode, int top_k, int n_q, int t0) {                                                        \
    moba_bwd::BODY<T, D>(q, k, v, dout, stats, pairs, seg_off, seg_order, dq_acc, part_dq, dk, dv, dk_acc, dv_acc,     \
                         seqlen, heads, kv_heads, block_size, n_blocks, batch_index, h0, n_seg, causal, scale,         \
                         scale_log2, sub0, n_sub_launch, dq_mode, dkv_mode, top_k, n_q, t0);                          \
  }

}  // namespace moba_bwd

#endif  // MOBALAB_ATTENTION_BWD_WGMMA_CUH
