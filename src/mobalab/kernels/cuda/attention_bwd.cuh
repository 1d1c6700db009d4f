// MoBA attention backward, key-block-major with recomputation: device helpers and the templated bodies.
//
// Work unit (one CTA): 64 keys of one key block j of one kv head (a "key sub-tile"; blocks of 128..512 keys
// have several, blocks of 16/32 keys fill the first 16/32 rows and mask the rest), and every (query, head,
// slot) row of the chunk that selected j, in the forward's stable (head, query, slot) order, in tiles of 64
// gathered rows. Per tile, with x = scale*log2(e) * q.k and lse2 = log2(e) * lse from the forward:
//     P = 2^(x - lse2) (0 where masked),  dV += P^T dO,  dP = dO V^T,  dS = P o (dP - D),
//     dK += scale * dS^T Q,  dQ(rows) += scale * dS K,            D = rowsum(dO o O)
// dK and dV stay in registers (each warp owns 16 keys) over all rows and are written once; GQA is free:
// the rows of one kv head's segment come from all of its query heads. dQ of a tile is reduced over the
// CTA's 64 keys through shared memory (dS^T in bf16/fp16) and then either atomically added to an fp32
// (batch, seqlen, heads, d) accumulator (fast, run-to-run order of float additions varies) or written to
// a per-(query, head, slot) partial (deterministic; a merge kernel sums slots in slot order, and key
// sub-tiles of one block are separate launches in a fixed order).
//
// Tensor cores: mma.sync m16n8k16 with fp32 accumulation; operands via ldmatrix from 16-byte-swizzled
// shared memory (PTX wrappers in ptx.cuh; tile and slot helpers shared with the forward, attention.cuh).
//
// Head dims D = 32, 64, 96, 128: 4 warps, each owning 16 keys x all D columns of dK and dV (D accumulator
// registers per lane: 128 at D = 128, 255 in all with operands). D = 256 would need 256 of them, so
// 8 warps in pairs (kBwdSplit): warps w and w + 4 share keys 16 (w & 3) .. and own columns 0 .. 127 and
// 128 .. 255 of their dK, dV and of the dQ rows; one of the pair computes S^T = K Q^T, the other
// dP^T = V dO^T (each over all of D), they trade the fp32 fragments (1 KB per warp) through shared memory
// behind a 64-thread named barrier, and both form P and dS, in steps of 16 gathered rows: per warp and step
// 2048 * 128 FLOP (S^T, dP^T, dV, dK) against 192 * 128 bytes of ldmatrix (10.7 FLOP/B), with 128 accumulator
// registers (254 in all). Up to D = 128 a warp takes 32 gathered rows per step (MOBA_BWD_RS), so that each K and
// V fragment serves 32 rows: 4096 * 128 FLOP against 320 * 128 bytes (12.8 FLOP/B). Measured on an H200 against
// 16-row steps (interleaved, backward at 8K and 64K): 6% faster at D = 128, 10% at D = 64. Passes of 64 dQ
// columns instead of 32 (8 MMA chains, the dS fragments loaded half as often) measured within 2% either way and
// were not kept. Against FlashMoBA's backward (same tiles of 64 gathered rows, same mma.sync, 1.86x fewer
// instructions issued for the same tensor work) see docs/design.md, "Backward".
// Shared memory: K, V, 2 x Q, 2 x dO tiles of 64 x D (768 D bytes), dS^T 8 KB, 3 x 64 row records 3 KB:
// 35 / 59 / 83 / 107 / 203 KB at D = 32 / 64 / 96 / 128 / 256, plus 16 KB of static exchange buffer at
// D = 256: two 4-warp CTAs per SM up to D = 128, one 8-warp CTA at D = 256 (the same 8 warps per SM).

#ifndef MOBALAB_ATTENTION_BWD_CUH
#define MOBALAB_ATTENTION_BWD_CUH

#include "attention.cuh"

#define MOBA_BWD_ROWS 64   // gathered rows per tile
#define MOBA_BWD_KEYS 64   // keys per CTA (4 warps x 16, or 4 pairs of warps x 16 at D = 256)
#define MOBA_BWD_THREADS 128
#ifndef MOBA_BWD_RS
#define MOBA_BWD_RS 32     // gathered rows per S^T / dP^T step of a warp (warp pairs at D = 256: 16)
#endif

namespace moba_bwd {

using moba::cp_async16;
using moba::cp_async_commit;
using moba::cp_async_wait;
using moba::Elem;
using moba::ldmatrix_x4;
using moba::ldmatrix_x4_trans;
using moba::red_add2;
using moba::smem_u32;
using moba::st_shared_b32;
using moba::swz;

// Warps per 16 keys (column parts of dK and dV) and threads of the main kernel, by head dim.
template <int D>
constexpr int kBwdSplit = D >= 256 ? 2 : 1;
template <int D>
constexpr int kBwdThreads = MOBA_BWD_THREADS * kBwdSplit<D>;

// Per gathered row: log2-scaled lse, D, query position t, head within the chunk (16 bytes, one cp.async).
struct RowInfo {
  float lse2;
  float delta;
  int t;
  int hc;
};

// Per (batch, query, head) row, what the backward's row records take from it: (lse log2(e), D), stored head-major
// ((batch, head, query) order) so that the records of a chunk, whose pairs run query after query within each head,
// read them from a few MB of nearby rows. Read from (lse, D) in (batch, query, head) order (16 heads apart), the
// row records' kernel moved ~3x the bytes it needed through DRAM (an H200 at 512K: L2 hit rate 37%, 257 us a chunk).
struct RowStat {
  float lse2;
  float delta;
};

// D = rowsum(dO o O) - dlse in fp32, one warp per (batch, query, head) row; with `stats`, the row's RowStat too
// (lse and dlse: (batch, seqlen, heads) fp32, dlse optional); with `zero_rows`, that row of the dQ accumulator
// (fp32 or the inputs' 16-bit type: `zero_bytes` 4 or 2 per element) set to 0, which spares the step a fill launch.
// A CTA takes `tokens` consecutive (batch, query) positions of every head (rows r0 .. r0 + tokens * heads, one
// contiguous run of out and dO) and stages their stats in shared memory, so that each head's stats leave as one
// run of tokens * 8 bytes: written by the warps one row at a time, 16 heads apart, the 8-byte stats had cost the
// launch ~0.47 ms at 512K on an H200 (4.60 against 4.13 ms without them); staged, the launch took 2.94 against
// 3.67 ms at 512K on an H100 (without zeroing). Each warp loads its next row before it reduces the current one.
// Measured and not kept before: the rows walked head-major (5.34 ms: consecutive warps then read rows 4 KB apart),
// and four rows per warp with all their loads issued first (equal).
constexpr int kDeltaStagedRows = 2048;  // stats staged per CTA (16 KB); more rows write theirs directly

template <typename T, int D>
__device__ __forceinline__ void delta_row_load(const T* o, const T* g, int lane, uint4& a, uint4& b) {
  constexpr int V = moba::kRowLaneElems<D>;
  if (moba::kRowLanes<D> < 32 && lane >= moba::kRowLanes<D>) {
    a = b = make_uint4(0u, 0u, 0u, 0u);  // idle lane (D = 32, 96): adds 0 to the warp sum
  } else if constexpr (V == 8) {
    a = *reinterpret_cast<const uint4*>(o);
    b = *reinterpret_cast<const uint4*>(g);
  } else if constexpr (V == 4) {
    const uint2 x = *reinterpret_cast<const uint2*>(o), y = *reinterpret_cast<const uint2*>(g);
    a = make_uint4(x.x, x.y, 0u, 0u);
    b = make_uint4(y.x, y.y, 0u, 0u);
  } else {
    a = make_uint4(*reinterpret_cast<const unsigned*>(o), 0u, 0u, 0u);
    b = make_uint4(*reinterpret_cast<const unsigned*>(g), 0u, 0u, 0u);
  }
}

// Position of (batch-major query position bt, head h)'s RowStat in the head-major stats.
__device__ __forceinline__ long long stat_index(long long bt, int h, int seqlen, int heads) {
  const long long b = bt / seqlen;
  return (b * heads + h) * seqlen + (bt - b * seqlen);
}
// The same for batch b and query t (the row records' builders).
__device__ __forceinline__ long long stat_index(int b, int h, int t, int seqlen, int heads) {
  return (static_cast<long long>(b) * heads + h) * seqlen + t;
}

template <typename T, int D>
__device__ __forceinline__ void delta_rows(const void* out_, const void* dout_, float* delta, void* zero_rows,
                                           int zero_bytes, long long n_rows, const float* lse, const float* dlse,
                                           RowStat* stats, int seqlen, int heads, int tokens) {
  constexpr int V = moba::kRowLaneElems<D>;
  __shared__ RowStat staged[kDeltaStagedRows];  // [head][token of the CTA]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const long long bt0 = static_cast<long long>(blockIdx.x) * tokens;
  const long long n_bt = n_rows / heads;
  if (bt0 >= n_bt) return;
  const int n_tok = static_cast<int>(min(static_cast<long long>(tokens), n_bt - bt0));
  const int rows = n_tok * heads;
  const long long r0 = bt0 * heads;
  const bool stage = stats != nullptr && tokens * heads <= kDeltaStagedRows;  // the same in every thread
  const bool holds = moba::kRowLanes<D> == 32 || lane < moba::kRowLanes<D>;
  const T* out = static_cast<const T*>(out_) + lane * V;
  const T* dout = static_cast<const T*>(dout_) + lane * V;
  uint4 a, b;
  if (warp < rows) delta_row_load<T, D>(out + (r0 + warp) * D, dout + (r0 + warp) * D, lane, a, b);
  for (int i = warp; i < rows; i += warps) {
    const long long w = r0 + i;
    const uint4 ca = a, cb = b;
    if (i + warps < rows) delta_row_load<T, D>(out + (w + warps) * D, dout + (w + warps) * D, lane, a, b);
    if (zero_rows != nullptr && holds) {
      unsigned char* z = static_cast<unsigned char*>(zero_rows) + (w * D + lane * V) * zero_bytes;
      const int nb = V * zero_bytes;  // 4 .. 32 bytes, aligned to their size
      if (nb >= 16) {
        for (int e = 0; e < nb; e += 16) *reinterpret_cast<uint4*>(z + e) = make_uint4(0u, 0u, 0u, 0u);
      } else if (nb == 8) {
        *reinterpret_cast<uint2*>(z) = make_uint2(0u, 0u);
      } else {
        *reinterpret_cast<unsigned*>(z) = 0u;
      }
    }
    const T* ae = reinterpret_cast<const T*>(&ca);
    const T* be = reinterpret_cast<const T*>(&cb);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) acc = fmaf(static_cast<float>(ae[e]), static_cast<float>(be[e]), acc);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) {
      if (dlse != nullptr) acc -= dlse[w];
      delta[w] = acc;
      if (stats != nullptr) {
        const RowStat st{lse[w] * 1.4426950408889634f, acc};
        const int tt = i / heads, h = i - tt * heads;
        if (stage) {
          staged[h * tokens + tt] = st;
        } else {
          stats[stat_index(bt0 + tt, h, seqlen, heads)] = st;
        }
      }
    }
  }
  if (stage) {
    __syncthreads();
    for (int j = threadIdx.x; j < tokens * heads; j += blockDim.x) {
      const int h = j / tokens, tt = j - h * tokens;
      if (tt < n_tok) stats[stat_index(bt0 + tt, h, seqlen, heads)] = staged[j];
    }
  }
}

// Row records of a chunk's sorted list: position i holds pair p = pairs[i] = (hc * n_q + tt) * top_k + slot.
// Positions from seg_off[n_seg] on (unused slots) are never read by the main kernel and get no record. One RowStat
// load per record (1.18 against 4.32 ms per 512K step for lse and D read apart; four records per thread with their
// loads issued together measured equal: the kernel is bound by throughput, not latency).
__device__ __forceinline__ void build_rows(const long long* pairs, const long long* seg_off, const RowStat* stats,
                                           RowInfo* rows, long long n_pairs, int n_seg, int seqlen, int heads,
                                           int top_k, int batch_index, int h0, int n_q, int t0) {
  // the listed pairs: unused slots (-1) sort after every segment, from seg_off[n_seg] on
  const long long n_listed = min(seg_off[n_seg], n_pairs);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_listed;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    // a chunk holds < 2^31 pairs (its scratch is bounded by the budget), so 32-bit division is exact
    const int p = static_cast<int>(pairs[i]);
    const int rest = p / top_k;
    const int tt = rest % n_q;
    const int hc = rest / n_q;
    const int t = t0 + tt;
    const RowStat st = stats[stat_index(batch_index, h0 + hc, t, seqlen, heads)];
    *reinterpret_cast<float4*>(rows + i) = make_float4(st.lse2, st.delta, __int_as_float(t), __int_as_float(hc));
  }
}

// Where the mma.sync kernels put chunk ch (16 bytes) of row `row` of a ROWS x D tile: ptx.cuh's XOR swizzle over
// rows of D * 2 bytes. landed() runs after a thread's copies have landed, before the barrier that publishes them
// (nothing to do for ldmatrix readers; the wgmma kernel's layout, attention_bwd_wgmma.cuh, fences the async proxy).
template <int D>
struct SwzTile {
  static constexpr bool kRowStep = false;  // see Sw128Tile (attention_bwd_wgmma.cuh)
  template <int ROWS>
  __device__ static __forceinline__ unsigned at(int row, int ch) { return swz<D>(row, ch); }
  __device__ static __forceinline__ void landed() {}
  __device__ static __forceinline__ void sync() { __syncthreads(); }  // every thread of the CTA computes
};

// Gather the Q and dO rows of one tile (rows >= count zero-filled) into swizzled 64 x D tiles (layout L).
template <int D, int NTHREADS, class L = SwzTile<D>>
__device__ __forceinline__ void gather_tile(unsigned sq, unsigned sdo, const char* qb, const char* gb,
                                            const RowInfo* info, int count, long long row_base, int heads, int h0,
                                            int tid) {
  constexpr int CH = D / 8;
  // L::kRowStep: the layout repeats every 8 rows, so a thread's copies (NTHREADS / CH rows apart, same chunk) sit a
  // constant apart: one address, the rest immediate offsets
  constexpr bool kStep = L::kRowStep && NTHREADS % CH == 0 && (NTHREADS / CH) % 8 == 0;
#pragma unroll
  for (int i = 0; i < MOBA_BWD_ROWS * CH / NTHREADS; ++i) {
    const int c = tid + i * NTHREADS;
    const int row = c / CH, ch = c % CH;
    const bool ok = row < count;
    long long off = 0;
    if (ok) off = ((row_base + info[row].t) * heads + (h0 + info[row].hc)) * (D * 2) + ch * 16;
    unsigned at;
    if constexpr (kStep) at = L::template at<MOBA_BWD_ROWS>(tid / CH, tid % CH) + i * (NTHREADS / CH) * L::kRowBytes;
    else at = L::template at<MOBA_BWD_ROWS>(row, ch);
    cp_async16(sq + at, qb + off, ok ? 16 : 0);
    cp_async16(sdo + at, gb + off, ok ? 16 : 0);
  }
}

__device__ __forceinline__ void load_info(unsigned dst, const RowInfo* rows, long long first, int count, int tid) {
  if (tid < MOBA_BWD_ROWS) {
    const bool ok = tid < count;
    cp_async16(dst + tid * 16, rows + (ok ? first + tid : 0), ok ? 16 : 0);
  }
}

// What one CTA of the main kernel owns: KEYS keys key0 .. key_end - 1 of key block j of kv head kvh (segment seg
// of the chunk's list, sub-tile sub of the block) and the segment's n_rows gathered rows from position first of the
// sorted list, in n_tiles tiles. ok is false for a CTA past the segments or past the block's real keys: it computes
// and writes nothing (seg_off is not read).
struct CtaWork {
  bool ok;
  int kvh, key0, key_end, n_tiles;
  long long first, n_rows, row_base;
};

// seg_order (null: segment order) lists the segments longest first: CTAs start in grid order, so the long lists
// (the first key blocks of a causal sequence hold several times the mean) start first and the short ones fill
// the last wave, instead of a long one running alone at the end.
template <int KEYS>
__device__ __forceinline__ CtaWork cta_work(const long long* seg_off, const int* seg_order, int seqlen, int heads,
                                            int kv_heads, int block_size, int n_blocks, int batch_index, int h0,
                                            int n_seg, int sub0, int n_sub_launch) {
  CtaWork w{};
  const long long cta = blockIdx.x;
  const int slot = static_cast<int>(cta / n_sub_launch);
  const int sub = sub0 + static_cast<int>(cta % n_sub_launch);
  if (slot >= n_seg) return w;
  const int seg = seg_order != nullptr ? seg_order[slot] : slot;
  const int kvc = seg / n_blocks, j = seg % n_blocks;
  w.kvh = h0 / (heads / kv_heads) + kvc;
  w.key0 = j * block_size + sub * KEYS;
  w.key_end = min(min(j * block_size + block_size, seqlen), w.key0 + KEYS);
  if (w.key0 >= w.key_end) return w;
  w.ok = true;
  w.first = seg_off[seg];
  w.n_rows = seg_off[seg + 1] - w.first;
  w.n_tiles = static_cast<int>((w.n_rows + MOBA_BWD_ROWS - 1) / MOBA_BWD_ROWS);
  w.row_base = static_cast<long long>(batch_index) * seqlen;
  return w;
}

// Rows of tile ti of a segment of n_rows gathered rows (MOBA_BWD_ROWS, but for the last tile).
__device__ __forceinline__ int tile_rows(long long n_rows, int ti) {
  return static_cast<int>(min(n_rows - static_cast<long long>(ti) * MOBA_BWD_ROWS, (long long)MOBA_BWD_ROWS));
}

// A CTA's start (its work w): the first tile's row records, then K and V rows key0 .. key0 + KEYS - 1 of kv head kvh
// into swizzled KEYS x D tiles (keys >= key_end zero-filled: they then contribute exactly 0 everywhere), two
// cp.async groups; the records are waited for, then the first tile's gather (which needs them) and the second
// tile's records are committed, and begin_tile waits for all three. K and V land under the gather: waiting for
// them before it, one round trip more per CTA, made the "block" backward 1.2% / 1.6% / 0.4% slower at 8K / 16K /
// 64K on an H200.
// cp.async of K and V rows key0 .. key0 + KEYS - 1 of the CTA's kv head into KEYS x D tiles (layout L), keys >= key_end
// zero-filled (not committed).
template <int D, int KEYS, int NTHREADS, class L>
__device__ __forceinline__ void load_kv(unsigned sK, unsigned sV, const void* k_, const void* v_, const CtaWork& w,
                                        int kv_heads, int tid) {
  constexpr int CH = D / 8;
  const long long kv_row_bytes = static_cast<long long>(kv_heads) * D * 2;
  const long long kv_base = (w.row_base * kv_heads + w.kvh) * D * 2;
  const char* kb = static_cast<const char*>(k_) + kv_base;
  const char* vb = static_cast<const char*>(v_) + kv_base;
#pragma unroll
  for (int i = 0; i < KEYS * CH / NTHREADS; ++i) {
    const int c = tid + i * NTHREADS;
    const int row = c / CH, ch = c % CH;
    const int key = w.key0 + row;
    const bool ok = key < w.key_end;
    const long long off = ok ? static_cast<long long>(key) * kv_row_bytes + ch * 16 : 0;
    const unsigned at = L::template at<KEYS>(row, ch);
    cp_async16(sK + at, kb + off, ok ? 16 : 0);
    cp_async16(sV + at, vb + off, ok ? 16 : 0);
  }
}

template <int D, int KEYS, int NTHREADS, class L = SwzTile<D>>
__device__ __forceinline__ void start_segment(unsigned sK, unsigned sV, unsigned sQ, unsigned sdO, unsigned sInfoU,
                                              const RowInfo* sInfo, const void* k_, const void* v_, const char* qb,
                                              const char* gb, const RowInfo* rows, const CtaWork& w, int heads,
                                              int h0, int kv_heads, int tid) {
  const long long first = w.first, n_rows = w.n_rows, row_base = w.row_base;
  const int n_tiles = w.n_tiles;
  if (n_tiles > 0) load_info(sInfoU, rows, first, tile_rows(n_rows, 0), tid);
  cp_async_commit();
  load_kv<D, KEYS, NTHREADS, L>(sK, sV, k_, v_, w, kv_heads, tid);
  cp_async_commit();
  cp_async_wait<1>();  // the records' group: K and V may still be in flight
  __syncthreads();
  if (n_tiles > 0) {
    gather_tile<D, NTHREADS, L>(sQ, sdO, qb, gb, sInfo, tile_rows(n_rows, 0), row_base, heads, h0, tid);
    if (n_tiles > 1) load_info(sInfoU + MOBA_BWD_ROWS * 16, rows, first + MOBA_BWD_ROWS, tile_rows(n_rows, 1), tid);
  }
  cp_async_commit();
}

// The gathered tiles' pipeline: STAGES Q / dO buffers, so the gathers of the LEAD = STAGES - 1 tiles after the
// current one are in flight, and a gather needs its tile's row records, loaded LEAD tiles before it (2 LEAD + 1
// record buffers). The mma.sync kernels run two stages (start_segment), the wgmma kernel three.
template <int STAGES>
struct TilePipe {
  static constexpr int LEAD = STAGES - 1;
  static constexpr int INFOS = 2 * LEAD + 1;
};

// During tile ti: the gather of tile ti + LEAD (into Q / dO buffer (ti + LEAD) % STAGES) and the records of tile
// ti + 2 LEAD (into record buffer (ti + 2 LEAD) % INFOS), committed.
template <int D, int NTHREADS, class L = SwzTile<D>, int STAGES = 2>
__device__ __forceinline__ void prefetch_tiles(unsigned sQ, unsigned sdO, unsigned sInfoU, const RowInfo* sInfo,
                                               const char* qb, const char* gb, const RowInfo* rows, long long first,
                                               long long n_rows, int n_tiles, int ti, long long row_base, int heads,
                                               int h0, int tid) {
  constexpr unsigned TILE_BYTES = MOBA_BWD_ROWS * D * 2;
  constexpr int LEAD = TilePipe<STAGES>::LEAD, INFOS = TilePipe<STAGES>::INFOS;
  const int tg = ti + LEAD, tr = ti + 2 * LEAD;
  if (tg < n_tiles)
    gather_tile<D, NTHREADS, L>(sQ + (tg % STAGES) * TILE_BYTES, sdO + (tg % STAGES) * TILE_BYTES, qb, gb,
                                sInfo + (tg % INFOS) * MOBA_BWD_ROWS, tile_rows(n_rows, tg), row_base, heads, h0, tid);
  if (tr < n_tiles)
    load_info(sInfoU + (tr % INFOS) * MOBA_BWD_ROWS * 16, rows, first + static_cast<long long>(tr) * MOBA_BWD_ROWS,
              tile_rows(n_rows, tr), tid);
  cp_async_commit();
}

// Tile ti begins: waits for its gather and row records (and every thread's reads of the tile before), starts the
// next tiles' (prefetch_tiles) and, in the deterministic dQ modes, puts its rows' pair indices in s_pair. Returns
// its number of rows.
// PREFETCH false: the caller issues prefetch_tiles itself later in the tile (before the next begin_tile).
template <int D, int NTHREADS, class L = SwzTile<D>, int STAGES = 2, bool PREFETCH = true>
__device__ __forceinline__ int begin_tile(unsigned sQ, unsigned sdO, unsigned sInfoU, const RowInfo* sInfo,
                                          const char* qb, const char* gb, const RowInfo* rows, const CtaWork& w,
                                          int ti, int heads, int h0, const long long* pairs, long long* s_pair,
                                          int dq_mode, int tid) {
  cp_async_wait<STAGES - 2>();  // the gathers of the tiles after this one may still be in flight
  L::landed();
  L::sync();
  const int count = tile_rows(w.n_rows, ti);
  if (PREFETCH)
    prefetch_tiles<D, NTHREADS, L, STAGES>(sQ, sdO, sInfoU, sInfo, qb, gb, rows, w.first, w.n_rows, w.n_tiles, ti,
                                           w.row_base, heads, h0, tid);
  if (dq_mode != 0 && tid < MOBA_BWD_ROWS)
    s_pair[tid] = tid < count ? pairs[w.first + static_cast<long long>(ti) * MOBA_BWD_ROWS + tid] : -1;
  return count;
}

// Element offset of the dQ row of gathered row r of a tile (has: r < the tile's rows). Atomic mode: a row past the
// tile's end (its Q, dO and row record are zero-filled, so its P, dS and dQ sum are exact zeros) adds them to the
// tile's first row, so that every atomic is unconditional (predicated ones, even predicated in the instruction,
// compiled to a divergent branch each). Modes 1, 2: the row's slot partial (0 when past the end: not written).
template <int D>
__device__ __forceinline__ long long dq_row_offset(const RowInfo* info, const long long* s_pair, int r, bool has,
                                                   long long row_base, int heads, int h0, int dq_mode) {
  if (dq_mode == 0) {
    const RowInfo ri = info[has ? r : 0];
    return ((row_base + ri.t) * heads + (h0 + ri.hc)) * D;
  }
  return has ? s_pair[r] * D : 0;
}

// Adds scale * acc (NT n-tiles of 8 columns, C fragments of rows g and g + 8) to the dQ rows at row0 and row1 (this
// thread's columns): vector atomics (mode 0) or the slot partial stored (1) or added (2), rows past the end skipped.
template <int NT>
__device__ __forceinline__ void add_dq(float* row0, float* row1, bool has0, bool has1, const float (&acc)[NT][4],
                                       float scale, int dq_mode) {
  if (dq_mode == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      red_add2(row0 + nt * 8, acc[nt][0] * scale, acc[nt][1] * scale);
      red_add2(row1 + nt * 8, acc[nt][2] * scale, acc[nt][3] * scale);
    }
    return;
  }
  // mode 2 (add): every old value is loaded before any store, so the loads are in flight together (with stores in
  // between, possible aliasing would serialise eight load-store round trips).
  float2 old0[NT], old1[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    old0[nt] = old1[nt] = make_float2(0.f, 0.f);
    if (dq_mode == 2 && has0) old0[nt] = *reinterpret_cast<const float2*>(row0 + nt * 8);
    if (dq_mode == 2 && has1) old1[nt] = *reinterpret_cast<const float2*>(row1 + nt * 8);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (has0)
      *reinterpret_cast<float2*>(row0 + nt * 8) =
          make_float2(old0[nt].x + acc[nt][0] * scale, old0[nt].y + acc[nt][1] * scale);
    if (has1)
      *reinterpret_cast<float2*>(row1 + nt * 8) =
          make_float2(old1[nt].x + acc[nt][2] * scale, old1[nt].y + acc[nt][3] * scale);
  }
}

// dK (times scale) and dV of one key row from C fragments (h = 0: fragment row g, elements 0, 1; h = 1: row g + 8,
// elements 2, 3), NT n-tiles from element offset off: in the input type (dkv_mode 0) or fp32, stored (1) or added (2).
template <typename T, int NT>
__device__ __forceinline__ void store_dkv_row(void* dk_, void* dv_, float* dk_acc, float* dv_acc, long long off,
                                              const float (&dk)[NT][4], const float (&dv)[NT][4], int h, float scale,
                                              int dkv_mode) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float k0 = dk[nt][2 * h] * scale, k1 = dk[nt][2 * h + 1] * scale;
    const float v0 = dv[nt][2 * h], v1 = dv[nt][2 * h + 1];
    if (dkv_mode == 0) {
      *reinterpret_cast<unsigned*>(static_cast<T*>(dk_) + off + nt * 8) = Elem<T>::pack(k0, k1);
      *reinterpret_cast<unsigned*>(static_cast<T*>(dv_) + off + nt * 8) = Elem<T>::pack(v0, v1);
    } else {
      float2* pk = reinterpret_cast<float2*>(dk_acc + off + nt * 8);
      float2* pv = reinterpret_cast<float2*>(dv_acc + off + nt * 8);
      if (dkv_mode == 1) {
        *pk = make_float2(k0, k1);
        *pv = make_float2(v0, v1);
      } else {
        const float2 ok_ = *pk, ov = *pv;
        *pk = make_float2(ok_.x + k0, ok_.y + k1);
        *pv = make_float2(ov.x + v0, ov.y + v1);
      }
    }
  }
}

// The main backward body. dq_mode: 0 atomic add into dq_acc (batch, seqlen, heads, D) fp32;
// 1 store / 2 add into part_dq[pair * D] (deterministic). dkv_mode: 0 write dk/dv in the input type;
// 1 store / 2 add into fp32 dk_acc/dv_acc (a chunk plan that splits the query range).
template <typename T, int D>
__device__ __forceinline__ void bwd_tile(const void* q_, const void* k_, const void* v_, const void* dout_,
                                         const RowInfo* rows, const long long* pairs, const long long* seg_off,
                                         const int* seg_order, float* dq_acc, float* part_dq, void* dk_, void* dv_,
                                         float* dk_acc, float* dv_acc, int seqlen, int heads, int kv_heads,
                                         int block_size, int n_blocks, int batch_index, int h0, int n_seg, int causal, float scale,
                                         float scale_log2, int sub0, int n_sub_launch, int dq_mode, int dkv_mode) {
  static_assert(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, "head dim");
  constexpr int SPLIT = kBwdSplit<D>;      // warps per 16 keys
  constexpr int NTHREADS = kBwdThreads<D>;
  constexpr int DT = D / 8;
  constexpr int DTW = DT / SPLIT;          // n-tiles (8 columns) of dK / dV per warp
  constexpr int RS = SPLIT == 1 ? MOBA_BWD_RS : 16;  // gathered rows per S^T / dP^T step
  constexpr unsigned TILE_BYTES = MOBA_BWD_ROWS * D * 2;
  MOBA_DYNAMIC_SMEM(smem);
  const unsigned sK = smem_u32(smem);
  const unsigned sV = sK + TILE_BYTES;
  const unsigned sQ = sV + TILE_BYTES;             // 2 buffers
  const unsigned sdO = sQ + 2 * TILE_BYTES;        // 2 buffers
  const unsigned sdS = sdO + 2 * TILE_BYTES;       // 64 keys x 64 rows, swizzled as D = 64
  unsigned char* info_base = smem + 6 * TILE_BYTES + MOBA_BWD_KEYS * MOBA_BWD_ROWS * 2;  // 3 x 64 RowInfo
  const RowInfo* sInfo = reinterpret_cast<const RowInfo*>(info_base);
  const unsigned sInfoU = smem_u32(info_base);
  __shared__ long long s_pair[MOBA_BWD_ROWS];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int kw = SPLIT == 1 ? warp : (warp & 3);  // this warp's 16 keys: kw * 16 ..
  const int dh = SPLIT == 1 ? 0 : (warp >> 2);    // its part of the dK / dV / dQ columns: dh * D / SPLIT ..
  const CtaWork w = cta_work<MOBA_BWD_KEYS>(seg_off, seg_order, seqlen, heads, kv_heads, block_size, n_blocks,
                                            batch_index, h0, n_seg, sub0, n_sub_launch);
  if (!w.ok) return;  // past the segments, or a sub-tile beyond the block's real keys: nothing to compute or write
  const int kvh = w.kvh, key0 = w.key0, key_end = w.key_end;
  const long long row_base = w.row_base;

  const char* qb = static_cast<const char*>(q_);
  const char* gb = static_cast<const char*>(dout_);
  start_segment<D, MOBA_BWD_KEYS, NTHREADS>(sK, sV, sQ, sdO, sInfoU, sInfo, k_, v_, qb, gb, rows, w, heads, h0, kv_heads,
                                            tid);

  float dk[DTW][4], dv[DTW][4];
#pragma unroll
  for (int i = 0; i < DTW; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  const int kr0 = kw * 16 + g;  // this thread's key rows kr0 and kr0 + 8 (within the sub-tile)
  const int key_a = key0 + kr0, key_b = key_a + 8;
  const bool ok_a = key_a < key_end, ok_b = key_b < key_end;

  for (int ti = 0; ti < w.n_tiles; ++ti) {
    const int count = begin_tile<D, NTHREADS>(sQ, sdO, sInfoU, sInfo, qb, gb, rows, w, ti, heads, h0, pairs, s_pair,
                                              dq_mode, tid);
    const RowInfo* info = sInfo + (ti % 3) * MOBA_BWD_ROWS;

    const unsigned sq = sQ + (ti & 1) * TILE_BYTES;
    const unsigned sdo = sdO + (ti & 1) * TILE_BYTES;
    // RS gathered rows at a time: S^T and dP^T (16 keys x RS rows per warp), then dV, dK, dS^T. The K and V
    // A fragments of a k-step serve RS / 8 n-tiles of rows: RS = 32 loads them half as often as RS = 16.
#pragma unroll 1
    for (int c = 0; c < MOBA_BWD_ROWS / RS; ++c) {
      constexpr int NT = RS / 8;  // n-tiles (8 rows) per step
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
      if constexpr (SPLIT == 1) {
#pragma unroll 4  // 4 k-steps at a time: fully unrolled, the 32-row step spills at D = 128
        for (int ks = 0; ks < D / 16; ++ks) {
          unsigned ka[4], va[4];
          const int arow = warp * 16 + (lane & 15), ach = ks * 2 + (lane >> 4);
          ldmatrix_x4(sK + swz<D>(arow, ach), ka[0], ka[1], ka[2], ka[3]);
          ldmatrix_x4(sV + swz<D>(arow, ach), va[0], va[1], va[2], va[3]);
#pragma unroll
          for (int h = 0; h < RS / 16; ++h) {
            // B operands: rows c*RS + h*16 .. + 15 as [n = row][k = d], k-step ks: matrices (nt, khalf)
            const int brow = c * RS + h * 16 + ((lane >> 4) << 3) + (lane & 7), bch = ks * 2 + ((lane >> 3) & 1);
            unsigned qb0, qb1, qb2, qb3, gb0, gb1, gb2, gb3;
            ldmatrix_x4(sq + swz<D>(brow, bch), qb0, qb1, qb2, qb3);
            ldmatrix_x4(sdo + swz<D>(brow, bch), gb0, gb1, gb2, gb3);
            Elem<T>::mma(s[2 * h], ka, qb0, qb1);
            Elem<T>::mma(s[2 * h + 1], ka, qb2, qb3);
            Elem<T>::mma(dp[2 * h], va, gb0, gb1);
            Elem<T>::mma(dp[2 * h + 1], va, gb2, gb3);
          }
        }
      } else {
        static_assert(RS == 16 || SPLIT == 1, "warp pairs trade 16-row fragments");
        // Pairs: warp dh = 0 computes S^T = K Q^T, warp dh = 1 dP^T = V dO^T (16 keys x 16 rows, all of D);
        // the two trade their raw fp32 fragments, so that both hold S and dP in the same fragment layout.
        // Buffers alternate with c: a warp rewrites one only after the pair's next barrier, which its
        // partner reaches after reading it.
        __shared__ float4 s_xchg[4][2][2][2][32];  // [key group][c & 1][S, dP][n-tile][lane]
        float x[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) x[nt][e] = 0.f;
        const unsigned sa = dh ? sV : sK, sb = dh ? sdo : sq;
#pragma unroll 4
        for (int ks = 0; ks < D / 16; ++ks) {
          unsigned a[4];
          const int arow = kw * 16 + (lane & 15), ach = ks * 2 + (lane >> 4);
          ldmatrix_x4(sa + swz<D>(arow, ach), a[0], a[1], a[2], a[3]);
          const int brow = c * 16 + ((lane >> 4) << 3) + (lane & 7), bch = ks * 2 + ((lane >> 3) & 1);
          unsigned b0, b1, b2, b3;
          ldmatrix_x4(sb + swz<D>(brow, bch), b0, b1, b2, b3);
          Elem<T>::mma(x[0], a, b0, b1);
          Elem<T>::mma(x[1], a, b2, b3);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
          s_xchg[kw][c & 1][dh][nt][lane] = make_float4(x[nt][0], x[nt][1], x[nt][2], x[nt][3]);
        moba::bar_sync(1 + kw, 64);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const float4 y = s_xchg[kw][c & 1][dh ^ 1][nt][lane];
          const float yv[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[nt][e] = dh ? yv[e] : x[nt][e];
            dp[nt][e] = dh ? x[nt][e] : yv[e];
          }
        }
      }
      // P and dS, element (key row kr0 (+8), gathered row c*RS + nt*8 + 2tq + (e&1)).
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = c * RS + nt * 8 + 2 * tq + (e & 1);
          const RowInfo ri = info[r];
          // Masked elements get 2^-inf = +0 (ex2.approx; the finite dP of a masked element times 0 is 0). From
          // the row's last visible key relative to key_a (-1: a row past the tile's end), the mask is one compare
          // against a constant and a select of the finite exponent (FSEL, no branch): about half the instructions
          // of testing key end, tile end and causality per element. D = 32 keeps that per-element test (its
          // short-circuit form, the mask added to the exponent): the select took it from 128 to 144 registers,
          // a CTA per SM fewer
          float p;
          if constexpr (D >= 64) {
            const int last = r < count ? (causal ? min(ri.t, key_end - 1) : key_end - 1) - key_a : -1;
            const float x = s[nt][e] * scale_log2 - ri.lse2;
            p = exp2f((e < 2 ? 0 : 8) <= last ? x : __int_as_float(0xff800000u));
          } else {
            const bool ok = ((e < 2) ? ok_a : ok_b) && r < count && (!causal || ((e < 2) ? key_a : key_b) <= ri.t);
            p = exp2f(s[nt][e] * scale_log2 - ri.lse2 + (ok ? 0.f : __int_as_float(0xff800000u)));
          }
          s[nt][e] = p;
          dp[nt][e] = p * (dp[nt][e] - ri.delta);
        }
      unsigned pa[RS / 16][4], da[RS / 16][4];  // A fragments (16 keys x 16 rows) of each 16-row half
#pragma unroll
      for (int h = 0; h < RS / 16; ++h) {
        pa[h][0] = Elem<T>::pack(s[2 * h][0], s[2 * h][1]);
        pa[h][1] = Elem<T>::pack(s[2 * h][2], s[2 * h][3]);
        pa[h][2] = Elem<T>::pack(s[2 * h + 1][0], s[2 * h + 1][1]);
        pa[h][3] = Elem<T>::pack(s[2 * h + 1][2], s[2 * h + 1][3]);
        da[h][0] = Elem<T>::pack(dp[2 * h][0], dp[2 * h][1]);
        da[h][1] = Elem<T>::pack(dp[2 * h][2], dp[2 * h][3]);
        da[h][2] = Elem<T>::pack(dp[2 * h + 1][0], dp[2 * h + 1][1]);
        da[h][3] = Elem<T>::pack(dp[2 * h + 1][2], dp[2 * h + 1][3]);
      }
      // dS^T to shared memory (4-byte stores; rows = keys, 64 gathered rows of 2 bytes per key row).
      if (SPLIT == 1 || dh == 0) {
        const unsigned base = sdS + 4 * tq;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int chunk = c * NT + nt;
          const int h = nt >> 1, o = (nt & 1) * 2;
          st_shared_b32(base + swz<64>(kr0, chunk), da[h][o]);
          st_shared_b32(base + swz<64>(kr0 + 8, chunk), da[h][o + 1]);
        }
      }
      // dV += P^T dO, dK += dS^T Q  (B = rows c*RS + h*16.. as [k = row][n = d] via ldmatrix.trans), this
      // warp's columns
#pragma unroll
      for (int h = 0; h < RS / 16; ++h) {
#pragma unroll
        for (int dpair = 0; dpair < DTW / 2; ++dpair) {
          const int row = c * RS + h * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int ch = (dh * (DTW / 2) + dpair) * 2 + (lane >> 4);
          unsigned b0, b1, b2, b3;
          ldmatrix_x4_trans(sdo + swz<D>(row, ch), b0, b1, b2, b3);
          Elem<T>::mma(dv[2 * dpair], pa[h], b0, b1);
          Elem<T>::mma(dv[2 * dpair + 1], pa[h], b2, b3);
          ldmatrix_x4_trans(sq + swz<D>(row, ch), b0, b1, b2, b3);
          Elem<T>::mma(dk[2 * dpair], da[h], b0, b1);
          Elem<T>::mma(dk[2 * dpair + 1], da[h], b2, b3);
        }
      }
    }
    __syncthreads();  // dS^T complete

    // dQ for this warp's 16 gathered rows: dS (16 x 64 keys) K (64 keys x D), 32 columns of D per pass
    // (pairs: each warp of the pair its part of the columns).
    const int r0 = kw * 16 + g, r1 = r0 + 8;
    // this thread's two dQ rows (columns 2 tq, 2 tq + 1 of every 8), computed once per tile, so that each pass
    // addresses them by immediate offsets
    float* dq_base = dq_mode == 0 ? dq_acc : part_dq;
    const bool has0 = r0 < count, has1 = r1 < count;
    float* const row0 = dq_base + dq_row_offset<D>(info, s_pair, r0, has0, row_base, heads, h0, dq_mode) + 2 * tq;
    float* const row1 = dq_base + dq_row_offset<D>(info, s_pair, r1, has1, row_base, heads, h0, dq_mode) + 2 * tq;
#pragma unroll 1
    for (int half = dh * (DTW / 4); half < (dh + 1) * (DTW / 4); ++half) {
      constexpr int HT = 4;  // n-tiles (of 8 columns) per pass: 32 columns of D
      float acc[HT][4];
#pragma unroll
      for (int i = 0; i < HT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < MOBA_BWD_KEYS / 16; ++kk) {
        unsigned a[4];
        // A = dS (m = gathered row, k = key) from dS^T storage: matrix j = (m half j&1, k half j>>1)
        const int mj = lane >> 3;
        const int arow = kk * 16 + (mj >> 1) * 8 + (lane & 7), ach = kw * 2 + (mj & 1);
        ldmatrix_x4_trans(sdS + swz<64>(arow, ach), a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int dpair = 0; dpair < HT / 2; ++dpair) {
          const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int ch = (half * HT / 2 + dpair) * 2 + (lane >> 4);
          unsigned b0, b1, b2, b3;
          ldmatrix_x4_trans(sK + swz<D>(row, ch), b0, b1, b2, b3);
          Elem<T>::mma(acc[2 * dpair], a, b0, b1);
          Elem<T>::mma(acc[2 * dpair + 1], a, b2, b3);
        }
      }
      const int col0 = half * HT * 8;
      add_dq<HT>(row0 + col0, row1 + col0, has0, has1, acc, scale, dq_mode);
    }
    // the next iteration's wait + barrier orders these reads before dS^T / buffers are rewritten
  }
  cp_async_wait<0>();

  // dK (scaled) and dV of this thread's key rows.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = r ? key_b : key_a;
    if (!(r ? ok_b : ok_a)) continue;
    const long long off = ((row_base + key) * kv_heads + kvh) * D + dh * (D / SPLIT) + 2 * tq;
    store_dkv_row<T, DTW>(dk_, dv_, dk_acc, dv_acc, off, dk, dv, r, scale, dkv_mode);
  }
}

// Deterministic dQ: one warp per (query, head) of the chunk sums its slots' partials in slot order.
template <typename T, int D>
__device__ __forceinline__ void dq_merge(const float* part_dq, const int* topk, void* dq_, int seqlen, int heads,
                                         int top_k, int n_blocks, int batch_index, int h0, int n_heads_c, int t0,
                                         int n_q) {
  constexpr int V = moba::kRowLaneElems<D>;
  const int lane = threadIdx.x & 31;
  const bool holds = moba::kRowLanes<D> == 32 || lane < moba::kRowLanes<D>;  // this lane holds V elements
  const long long w = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= static_cast<long long>(n_heads_c) * n_q) return;
  const int hc = static_cast<int>(w / n_q), tt = static_cast<int>(w % n_q);
  const long long row = (static_cast<long long>(batch_index) * seqlen + (t0 + tt)) * heads + (h0 + hc);
  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  // four slots in flight at a time, summed in slot order (fixed order: deterministic)
  for (int s0 = 0; s0 < top_k; s0 += 4) {
    float x[4][V];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int s = s0 + u;
      const int jb = s < top_k ? topk[row * top_k + s] : -1;
      moba::load_slot_slice<V>(x[u], part_dq + (w * top_k + s) * D + lane * V, holds && !(jb < 0 || jb >= n_blocks));
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += x[u][e];
  }
  T* dq = static_cast<T*>(dq_) + row * D + lane * V;
  if (holds) {
#pragma unroll
    for (int e = 0; e < V; e += 2) *reinterpret_cast<unsigned*>(dq + e) = Elem<T>::pack(acc[e], acc[e + 1]);
  }
}

}  // namespace moba_bwd

// The main kernel of every variant: BODY is moba_bwd::bwd_tile (below), moba_bwd::bwd_block
// (attention_bwd_block.cuh: one 8-warp CTA per 128 keys, head dims 64 and 128) or moba_bwd::bwd_wgmma
// (attention_bwd_wgmma.cuh, its own module), BOUNDS the parenthesised arguments of its __launch_bounds__ (the block
// size first); the parameter list is the launch plan's.
#define MOBA_BWD_KERNEL(NAME, BODY, BOUNDS, T, D)                                                                     \
  extern "C" __global__ void __launch_bounds__ BOUNDS NAME(                                                           \
      const void* q, const void* k, const void* v, const void* dout, const void* rows, const long long* pairs,        \
      const long long* seg_off, const int* seg_order, float* dq_acc, float* part_dq, void* dk, void* dv,             \
      float* dk_acc, float* dv_acc, int seqlen, int heads, int kv_heads, int block_size, int n_blocks,               \
      int batch_index, int h0, int n_seg, int causal, float scale, float scale_log2, int sub0, int n_sub_launch,     \
      int dq_mode, int dkv_mode) {                                                                                    \
    moba_bwd::BODY<T, D>(q, k, v, dout, static_cast<const moba_bwd::RowInfo*>(rows), pairs, seg_off, seg_order,       \
                         dq_acc, part_dq, dk, dv, dk_acc, dv_acc, seqlen, heads, kv_heads, block_size, n_blocks,      \
                         batch_index, h0, n_seg, causal, scale, scale_log2, sub0, n_sub_launch, dq_mode, dkv_mode);   \
  }

#endif  // MOBALAB_ATTENTION_BWD_CUH
