// Key-block-major pair lists of one chunk by a stable counting sort (mobalab.kernels._pairs has the plans and
// the torch reference; the result equals cuda/attention.cu's moba_attn_keys + a stable torch.sort +
// moba_attn_bounds + moba_attn_segments exactly, pair for pair).
//
// Pair i = (hc * n_q + tt) * top_k + s of the chunk (query head h0 + hc, query t0 + tt, slot s) has the segment
// key (hc / group) * n_blocks + j for its block j = topk[b, t0 + tt, h0 + hc, s], or n_seg for an unused slot
// (j < 0 or j >= n_blocks); S = n_seg + 1 keys in all. The pairs are cut into tiles of T consecutive pairs, one
// CTA each; tile t holds c[t][key] pairs of each key. T is 4096 (narrow tiles: moba_pairs_count, _scatter) or
// 8192 (wide tiles, moba_pairs_count_wide, _scatter_wide): the work per (tile, column) then halves per pair, against
// half the CTAs. Where a tile's key window is wide (RADIX_MIN_WINDOW columns in _pairs.py) the two-digit sort
// below takes their place by default.
// Key windows: the pairs run head after head, P = group * n_q * top_k of them per kv head, so tile t only holds
// keys of kv heads lo(t) = t T / P .. lo(t) + span - 1 (span: the most kv heads a tile reaches, 1 where
// tiles do not cross a kv head's end) and the unused-slot key. Its row of the count table has W = win + 1
// columns (win = span n_blocks): column c < win is key lo(t) n_blocks + c, column win the key n_seg. Against a
// row of all S keys that is 1 / (kv heads of the chunk) of the table and of the scatter's shared memory (a chunk
// of 4 kv heads at 64K: 513 columns where there were 2049 keys).
//   moba_pairs_count    c[t][key] per tile (shared-memory atomics; counts do not depend on order); CTA 0
//                       also sets the scan's ticket counter to 0, so the ticket needs no fill launch of its own.
//   moba_pairs_scan     in place, c[t][key] <- sum_{t' < t} c[t'][key] (exclusive over tiles per key), the
//                       totals n[key]; the last CTA to finish (a ticket counter it resets to 0) writes
//                       seg_off[key] = sum_{key' < key} n[key'] (key = 0 .. n_seg) and, when tile_cum is not
//                       null, tile_cum[key] = sum_{key' < key, key' < n_seg} ceil(n[key'] / rows_per_unit).
//   moba_pairs_scatter  pair i of tile t goes to pos = seg_off[key] + c[t][key] + w[warp][key] + r, where
//                       w[warp][key] counts the key's pairs in the tile's earlier warps and r its pairs before
//                       i in i's warp: each warp walks its T / 8 consecutive pairs in order, 32 at
//                       a time, ranking equal keys with __match_any_sync into its row of 16-bit counts; the
//                       earlier warps' rows are then summed per pair, not per key. pairs[pos] = i
//                       (sorted_keys[pos] = key when sorted_keys is not null).
// Every position is ordered by (key, i): the stable sort, so the lists and every result computed from them are
// the same as with the torch sort, run after run. Shared memory: moba_pairs_count 4 W bytes, moba_pairs_scatter
// 20 W bytes (8 warps x 16-bit counts + a 32-bit base per column). Positions are 32-bit (the plans keep n_pairs
// below 2^31).
//
// Traffic per pair: topk read twice (8 B), pairs written (8 B; + 4 B of sorted keys for the backward); per
// (tile, column): c written, read and written, read (16 B), i.e. 16 W / T bytes per pair. Work per (tile,
// key) is what grows with context (at 512K a chunk has S = 4097 keys, where tiles are wide): the scatter's is
// a 16-byte store per 8 keys and two coalesced loads, and the scan keeps a thread's counts in registers between
// its two passes. The scatter's stalls are its shared-memory and match operations (Nsight Compute at 64K: 52%
// short_scoreboard); per-(warp, column) starts built once per tile, so that a pair's position is one load instead
// of one per earlier warp, measured 0.97x at 64K (an H200, interleaved): not kept.

#ifndef MOBA_PAIRS_DYNAMIC_SMEM
#define MOBA_PAIRS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace moba_pairs {

constexpr int kPairsThreads = 256;  // PAIRS_THREADS in _pairs.py: threads of a scatter CTA (and a narrow count's)
constexpr int kPairsWarps = kPairsThreads / 32;
constexpr int kPairsRounds = 16;  // pairs per lane of a narrow tile (PAIRS_ROUNDS): 16 rather than 32 gives twice the
                                   // CTAs (4096-pair tiles); index building at 64K 0.76 -> 0.62 ms on an H200
// Wide tiles (WIDE_TILE, 8192 pairs) for wide key windows: the work per (tile, column) (the scatter's table zeroing
// and starts, the scan's entries) halves per pair, while the count keeps 16 pairs per thread in CTAs of 512.
constexpr int kWideRounds = 2 * kPairsRounds;   // the wide scatter's pairs per lane
constexpr int kWideCountThreads = 2 * kPairsThreads;
// topk loads in flight per thread (pair_keys): chosen when larger batches spilled (see pair_keys)
constexpr int kCountBatch = 8;
constexpr int kScatterBatch = 4;
constexpr int kWideScatterBatch = 8;
constexpr int kStoreBatch = 8;  // scatter rounds whose position loads come before their stores
constexpr int kScanThreads = 1024;  // SCAN_THREADS: 32 keys x 32 tile ranges per CTA; the last CTA scans keys
#ifndef MOBA_PAIRS_SCAN_CACHED
#define MOBA_PAIRS_SCAN_CACHED 16  // the host emulation's tests set 1, to run the scan's batches with small chunks
#endif
constexpr int kScanCached = MOBA_PAIRS_SCAN_CACHED;  // tiles per thread and batch of the scan, in registers
constexpr int kNoKey = -1;          // lanes past the end of the chunk

// The key window of tile t (see the header): its first key lo(t) n_blocks, and a key's column in it.
struct KeyWindow {
  int key_lo, win, n_seg;
  __device__ __forceinline__ KeyWindow(int tile, int tile_pairs, int pairs_per_kv, int n_blocks, int win_, int n_seg_)
      : key_lo(static_cast<int>(static_cast<long long>(tile) * tile_pairs / pairs_per_kv) * n_blocks),
        win(win_), n_seg(n_seg_) {}
  __device__ __forceinline__ int column(int key) const { return key == n_seg ? win : key - key_lo; }
  __device__ __forceinline__ int key(int column) const { return column == win ? n_seg : key_lo + column; }
};

// The topk entries of the pairs i, i + step, i + 2 step, ... of the chunk, walking (head, query, slot) of
// i = (hc n_q + tt) top_k + s by carries: a few divisions per thread where two per pair were half of the scatter's
// instructions (Nsight Compute at 512K). index() is valid for i < n_pairs.
struct PairWalk {
  int s, tt, hc;   // slot, query and head of the chunk
  int ds, dq;      // step = dq top_k + ds
  long long row0;  // topk row of query t0 at head h0: (batch_index seqlen + t0) heads + h0

  __device__ __forceinline__ PairWalk(int i, int step, int seqlen, int heads, int top_k, int batch_index, int h0,
                                      int t0, int n_q) {
    const int row = i / top_k;
    s = i - row * top_k;
    hc = row / n_q;
    tt = row - hc * n_q;
    dq = step / top_k;
    ds = step - dq * top_k;
    row0 = (static_cast<long long>(batch_index) * seqlen + t0) * heads + h0;
  }
  __device__ __forceinline__ long long index(int heads, int top_k) const {  // of pair i's topk entry
    return (row0 + static_cast<long long>(tt) * heads + hc) * top_k + s;
  }
  __device__ __forceinline__ void advance(int top_k, int n_q) {
    s += ds;
    int add = dq;
    if (s >= top_k) {
      s -= top_k;
      ++add;
    }
    tt += add;
    while (tt >= n_q) {  // at most once per step where n_q > step / top_k + 1 (any sequence of 257 tokens or more)
      tt -= n_q;
      ++hc;
    }
  }
};

// Segment keys (moba_attn_keys' rule; kNoKey past the chunk's end) of the pairs i0 + r step, r < kRounds: the topk
// loads of a batch of kBatch rounds are all issued before any is used. Turned into keys where it was loaded, inside
// the range check, each load was waited for before the next was issued (long_scoreboard the top stall of the count
// and the scatter, Nsight Compute at 512K). Per chunk on an H100 (queued, interleaved): the count 1.15-1.27x, the
// scatter 1.01-1.05x, the three launches 1.03-1.06x. Larger batches then spilled (the scatter at 8, the wide one
// at 16; the count as fast at 8 as at 16); since the scatter's earlier-warp sums run row by row they no longer
// spill, and the wide scatter at 16 measured within the spread (0.98-1.03x at 512K). A pair's kv head is i / P
// (P = group n_q top_k pairs per kv head), found by a cursor.
template <int kRounds, int kBatch>
__device__ __forceinline__ void pair_keys(int (&key)[kRounds], const int* topk, int i0, int step, int n_pairs,
                                          int n_seg, int seqlen, int heads, int top_k, int n_blocks, int batch_index,
                                          int h0, int t0, int n_q, int group) {
  static_assert(kRounds % kBatch == 0, "whole batches");
  PairWalk walk(i0, step, seqlen, heads, top_k, batch_index, h0, t0, n_q);
  const int per_kv = group * n_q * top_k;
  int kv = i0 / per_kv;
  long long next = static_cast<long long>(kv + 1) * per_kv;  // the next kv head's first pair
#pragma unroll
  for (int b = 0; b < kRounds; b += kBatch) {
#pragma unroll
    for (int r = b; r < b + kBatch; ++r) {
      key[r] = topk[i0 + r * step < n_pairs ? walk.index(heads, top_k) : 0];  // entry 0 stands in past the end
      walk.advance(top_k, n_q);
    }
#pragma unroll
    for (int r = b; r < b + kBatch; ++r) {
      const int i = i0 + r * step;
      while (i >= next && i < n_pairs) {
        ++kv;
        next += per_kv;
      }
      const int jb = key[r];
      key[r] = i >= n_pairs ? kNoKey : (jb >= 0 && jb < n_blocks) ? kv * n_blocks + jb : n_seg;
    }
  }
}

// Exclusive prefix sum of v over the CTA (blockDim.x a multiple of 32, at most 1024); `warp_tot` holds 32 ints.
// Ends with a barrier, so `warp_tot` may be reused at once.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_tot) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < n_warps ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < n_warps) warp_tot[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int out = incl - v + (warp > 0 ? warp_tot[warp - 1] : 0);
  __syncthreads();
  return out;
}


// Whether this CTA is the last of its launch to arrive on `ticket` (its writes made visible first; `flag` a shared
// int): the last one then sees every other CTA's writes, through volatile loads past its L1.
__device__ __forceinline__ bool arrive_last(unsigned* ticket, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!*flag) return false;
  __threadfence();
  return true;
}

// seg_off[key] = sum_{key' < key} n[key'] over the n_keys totals n (key = 0 .. n_seg) and, when tile_cum is not
// null, tile_cum[key] = sum_{key' < key, key' < n_seg} ceil(n[key'] / rows_per_unit), by the whole CTA (the last
// CTA of a scan: the totals come from other CTAs, so they are read with volatile loads, past its L1).
__device__ __forceinline__ void offsets_from_totals(const int* totals, int n_keys, int n_seg, int rows_per_unit,
                                                    long long* seg_off, long long* tile_cum, int* warp_tot) {
  const int tid = threadIdx.x;
  const int kper = (n_keys + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  const int k_begin = min(tid * kper, n_keys), k_end = min(k_begin + kper, n_keys);
  int sum = 0, units = 0;
  for (int s = k_begin; s < k_end; ++s) {
    const int n = *static_cast<volatile const int*>(totals + s);
    sum += n;
    if (tile_cum != nullptr && s < n_seg) units += (n + rows_per_unit - 1) / rows_per_unit;
  }
  int off = block_exclusive_scan(sum, warp_tot);
  int unit = block_exclusive_scan(units, warp_tot);
  for (int s = k_begin; s < k_end; ++s) {
    const int n = *static_cast<volatile const int*>(totals + s);
    seg_off[s] = off;
    off += n;
    if (tile_cum != nullptr) {
      tile_cum[s] = unit;
      if (s < n_seg) unit += (n + rows_per_unit - 1) / rows_per_unit;
    }
  }
}
}  // namespace moba_pairs

namespace moba_pairs {

// c[t][column] of tile t = blockIdx.x (kThreads x kRounds pairs: thread tid takes pairs first + r kThreads + tid).
template <int kThreads, int kRounds>
__device__ __forceinline__ void count_tile(const int* topk, int* counts, unsigned* ticket, int seqlen, int heads,
                                           int top_k, int n_blocks, int batch_index, int h0, int n_heads_c, int t0,
                                           int n_q, int group, int win, int* hist) {
  constexpr int kTile = kThreads * kRounds;
  const int n_seg = (n_heads_c / group) * n_blocks, n_cols = win + 1;
  const int n_pairs = n_heads_c * n_q * top_k;
  const KeyWindow kw(blockIdx.x, kTile, group * n_q * top_k, n_blocks, win, n_seg);
  const int tid = threadIdx.x;
  // The scan, the next launch on the stream, counts its CTAs on this ticket from 0: setting it here spares a
  // fill launch per call (a kernel boundary orders this store before the scan's atomics).
  if (blockIdx.x == 0 && tid == 0) *ticket = 0u;
  for (int s = tid; s < n_cols; s += kThreads) hist[s] = 0;
  __syncthreads();
  // every key of the thread's pairs first (loads in batches, pair_keys), then the shared-memory atomics
  const int first = blockIdx.x * kTile;
  int key[kRounds];
  pair_keys<kRounds, kCountBatch>(key, topk, first + tid, kThreads, n_pairs, n_seg, seqlen, heads, top_k, n_blocks,
                                  batch_index, h0, t0, n_q, group);
#pragma unroll
  for (int r = 0; r < kRounds; ++r)
    if (key[r] != kNoKey) atomicAdd(hist + kw.column(key[r]), 1);
  __syncthreads();
  int* row = counts + static_cast<long long>(blockIdx.x) * n_cols;
  for (int s = tid; s < n_cols; s += kThreads) row[s] = hist[s];
}

}  // namespace moba_pairs

// The count's entry points; the wide tiles' takes the same 16 pairs per thread on twice the threads (256 threads of
// 32 pairs took 20.4 against 14.8 us a chunk at 512K on an H100: half the CTAs).
#define MOBA_PAIRS_COUNT_KERNEL(name, threads)                                                                    \
  extern "C" __global__ void __launch_bounds__(threads) name(                                                     \
      const int* topk, int* counts, unsigned* ticket, int seqlen, int heads, int top_k, int n_blocks,             \
      int batch_index, int h0, int n_heads_c, int t0, int n_q, int group, int win) {                              \
    MOBA_PAIRS_DYNAMIC_SMEM(smem);                                                                                \
    moba_pairs::count_tile<threads, moba_pairs::kPairsRounds>(topk, counts, ticket, seqlen, heads, top_k,         \
                                                              n_blocks, batch_index, h0, n_heads_c, t0, n_q,      \
                                                              group, win, reinterpret_cast<int*>(smem));          \
  }
MOBA_PAIRS_COUNT_KERNEL(moba_pairs_count, moba_pairs::kPairsThreads)
MOBA_PAIRS_COUNT_KERNEL(moba_pairs_count_wide, moba_pairs::kWideCountThreads)

extern "C" __global__ void __launch_bounds__(moba_pairs::kScanThreads) moba_pairs_scan(
    int* counts, int n_tiles, int n_seg, int rows_per_unit, int* seg_total, unsigned* ticket, long long* seg_off,
    long long* tile_cum, int n_blocks, int pairs_per_kv, int win, int tile_pairs) {
  using namespace moba_pairs;
  __shared__ int part[32][33];
  __shared__ int warp_tot[32];
  __shared__ int is_last;
  const int n_keys = n_seg + 1, n_cols = win + 1;
  const int tid = threadIdx.x, lane = tid & 31, grp = tid >> 5;
  // 1. this CTA's 32 keys: thread (grp, lane) scans its part of the tiles that reach key `key` (those holding
  // pairs of its kv head; every tile for the unused-slot key), kScanCached tiles at a time: a round of
  // independent loads per batch, where a loop of loads and stores to the same table waited for each load in
  // turn. Up to kScanCached tiles per thread (512 per key) the counts stay in registers between the two passes.
  const int key = blockIdx.x * 32 + lane;
  // the key's column in tile t's row: key - lo(t) n_blocks, i.e. key % n_blocks in every tile of its kv head but
  // perhaps the first, which may start in an earlier kv head; the unused-slot key: the last column of every row
  int t_lo = 0, t_n = n_tiles, col_first = win, col = win;
  if (key < n_seg) {
    const int kv = key / n_blocks;
    const long long first = static_cast<long long>(kv) * pairs_per_kv;
    t_lo = static_cast<int>(first / tile_pairs);
    t_n = min(static_cast<int>((first + pairs_per_kv - 1) / tile_pairs), n_tiles - 1) + 1 - t_lo;
    col = key - kv * n_blocks;
    col_first = KeyWindow(t_lo, tile_pairs, pairs_per_kv, n_blocks, win, n_seg).column(key);
  }
  const int per = (t_n + 31) / 32;
  const int t_begin = t_lo + min(grp * per, t_n), t_end = t_lo + min(grp * per + per, t_n);
  auto at = [&](int t) -> long long { return static_cast<long long>(t) * n_cols + (t == t_lo ? col_first : col); };
  int c[kScanCached];
  int local = 0;
  if (key < n_keys)
    for (int tb = t_begin; tb < t_end; tb += kScanCached) {
#pragma unroll
      for (int j = 0; j < kScanCached; ++j) {
        c[j] = tb + j < t_end ? counts[at(tb + j)] : 0;
        local += c[j];
      }
    }
  part[grp][lane] = local;
  __syncthreads();
  int run = 0;
  for (int g = 0; g < grp; ++g) run += part[g][lane];
  if (key < n_keys) {
    for (int tb = t_begin; tb < t_end; tb += kScanCached) {
      if (per > kScanCached) {  // more than one batch: read this one again
#pragma unroll
        for (int j = 0; j < kScanCached; ++j) c[j] = tb + j < t_end ? counts[at(tb + j)] : 0;
      }
#pragma unroll
      for (int j = 0; j < kScanCached; ++j) {
        if (tb + j < t_end) counts[at(tb + j)] = run;
        run += c[j];
      }
    }
    if (grp == 31) seg_total[key] = run;  // the last range ends at the key's total
  }
  // 2. the last CTA to get here scans the totals
  if (!arrive_last(ticket, &is_last)) return;
  offsets_from_totals(seg_total, n_keys, n_seg, rows_per_unit, seg_off, tile_cum, warp_tot);
  if (tid == 0) *ticket = 0u;  // ready for the next chunk
}

namespace moba_pairs {

// Tile t = blockIdx.x of 32 x kRounds pairs per warp (kPairsWarps warps) to their positions (see the header).
template <int kRounds>
__device__ __forceinline__ void scatter_tile(const int* topk, const int* counts, const long long* seg_off,
                                             long long* pairs, int* sorted_keys, int seqlen, int heads, int top_k,
                                             int n_blocks, int batch_index, int h0, int n_heads_c, int t0, int n_q,
                                             int group, int win, unsigned char* smem) {
  constexpr int kTile = kPairsThreads * kRounds;
  const int n_seg = (n_heads_c / group) * n_blocks, n_cols = win + 1;
  const int n_pairs = n_heads_c * n_q * top_k;
  const KeyWindow kw(blockIdx.x, kTile, group * n_q * top_k, n_blocks, win, n_seg);
  unsigned short* wcount = reinterpret_cast<unsigned short*>(smem);  // [kPairsWarps][n_cols]
  const int table_bytes = (kPairsWarps * n_cols * 2 + 15) & ~15;
  int* base = reinterpret_cast<int*>(smem + table_bytes);  // [n_cols]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int v = tid; v < table_bytes / 16; v += kPairsThreads)  // 16-byte stores
    reinterpret_cast<uint4*>(smem)[v] = make_uint4(0u, 0u, 0u, 0u);
  // this warp's pairs, in order: i = first + 32 r + lane
  const int first = blockIdx.x * kTile + warp * 32 * kRounds;
  int key[kRounds];
  constexpr int kBatch = kRounds == kPairsRounds ? kScatterBatch : kWideScatterBatch;
  pair_keys<kRounds, kBatch>(key, topk, first + lane, 32, n_pairs, n_seg, seqlen, heads, top_k, n_blocks, batch_index,
                             h0, t0, n_q, group);
#pragma unroll
  for (int r = 0; r < kRounds; ++r)
    if (key[r] != kNoKey) key[r] = kw.column(key[r]);
  // per column, the tile's start of its key (seg_off + earlier tiles), by coalesced loads while the topk reads are
  // in flight; columns past the chunk's last kv head hold no pairs
  const int* col = counts + static_cast<long long>(blockIdx.x) * n_cols;
  for (int s = tid; s < n_cols; s += kPairsThreads) {
    const int k = kw.key(s);
    if (k <= n_seg) base[s] = static_cast<int>(seg_off[k]) + col[s];
  }
  __syncthreads();
  // rank of each pair among the earlier pairs of its column in this warp (key[r] becomes column << 16 | rank: a
  // tile holds at most 2^13 pairs and columns are below 2^15); the warp's row ends at its counts. (Shared-memory
  // atomics on pairs of 16-bit counts, eight rounds' atomics issued before their shuffles, took 0.96-1.04x this
  // load-store chain's time per scatter on an H100: not kept.)
  unsigned short* mine = wcount + warp * n_cols;
  const unsigned lower = (1u << lane) - 1u;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int k = key[r];
    const unsigned same = __match_any_sync(0xffffffffu, k);
    const int old = k != kNoKey ? mine[k] : 0;
    __syncwarp();
    if (k != kNoKey && (same & lower) == 0) mine[k] = static_cast<unsigned short>(old + __popc(same));
    __syncwarp();
    key[r] = k != kNoKey ? (k << 16) | (old + __popc(same & lower)) : kNoKey;
  }
  __syncthreads();
  // the pair's rank in the tile: its column's counts in the tile's earlier warps, summed per pair, not per column
  // (a tile holds kTile pairs, while a chunk at long context has as many keys, 4097 at 512K, most of them not in
  // the tile), row by row, so that a row's loads for all of the lane's pairs are independent (a pair's loads one
  // after another held a chain per pair: the scatter 1.02-1.06x at 512K, 0.98-1.02x at 16K-64K on an H100; a
  // per-column scan of the counts over the warps first, then one load per pair, 0.94-0.99x of this). The rank stays
  // below the tile's 2^13 pairs, inside key[r]'s low 16 bits.
  for (int w = 0; w < warp; ++w) {
    const unsigned short* row = wcount + w * n_cols;
#pragma unroll
    for (int r = 0; r < kRounds; ++r)
      if (key[r] != kNoKey) key[r] += row[key[r] >> 16];
  }
  // positions: the tile's start of the column plus the rank, a batch's loads before its stores (column 0's start
  // stands in for unused lanes, whose stores are skipped)
  static_assert(kRounds % kStoreBatch == 0, "whole batches");
#pragma unroll
  for (int b = 0; b < kRounds; b += kStoreBatch) {
    int pos[kStoreBatch];
#pragma unroll
    for (int j = 0; j < kStoreBatch; ++j) pos[j] = base[key[b + j] == kNoKey ? 0 : key[b + j] >> 16];
#pragma unroll
    for (int j = 0; j < kStoreBatch; ++j) {
      const int k = key[b + j];
      if (k == kNoKey) continue;
      const int p = pos[j] + (k & 0xffff);
      pairs[p] = first + 32 * (b + j) + lane;
      if (sorted_keys != nullptr) sorted_keys[p] = kw.key(k >> 16);
    }
  }
}

}  // namespace moba_pairs

// The scatter's entry points, 16 and 32 pairs per lane. The wide one asks for two CTAs per SM, which its shared
// memory allows anyway at wide windows; the bound dates from when the default target spilled (it now needs 80
// registers either way).
#define MOBA_PAIRS_SCATTER_KERNEL(name, bounds, rounds)                                                            \
  extern "C" __global__ void __launch_bounds__ bounds name(                                                        \
      const int* topk, const int* counts, const long long* seg_off, long long* pairs, int* sorted_keys,            \
      int seqlen, int heads, int top_k, int n_blocks, int batch_index, int h0, int n_heads_c, int t0, int n_q,     \
      int group, int win) {                                                                                        \
    MOBA_PAIRS_DYNAMIC_SMEM(smem);                                                                                 \
    moba_pairs::scatter_tile<rounds>(topk, counts, seg_off, pairs, sorted_keys, seqlen, heads, top_k, n_blocks,    \
                                     batch_index, h0, n_heads_c, t0, n_q, group, win, smem);                       \
  }
MOBA_PAIRS_SCATTER_KERNEL(moba_pairs_scatter, (256), moba_pairs::kPairsRounds)
MOBA_PAIRS_SCATTER_KERNEL(moba_pairs_scatter_wide, (256, 2), moba_pairs::kWideRounds)

// ---- The two-digit sort (RADIX_* in _pairs.py): the same lists by two stable counting passes over digits of
// the key, the low digit (lo_bits bits) first, then the high one (key >> lo_bits), each of at most kRadixBins values.
// The one-pass scatter above writes each pair to its own position: at long context a tile's 8192 pairs spread over
// its 4097 keys, about two a key, so every 8-byte store is a write of its own (at 512K the scatter is ~70% of the
// chunk's lists and bound by those stores). Here a tile's pairs go through shared memory in digit order and leave in
// runs of a digit's pairs (8192 / bins: ~64-128 of them, 256-1024 contiguous bytes), and the count tables hold
// (tile, digit) entries, not (tile, key). Stable passes over the low digit and then the high digit order the pairs
// by (high, low, i) = (key, i): the stable sort. Per chunk six launches:
//   radix_count_lo    per tile of kRadixTile pairs the count of each low digit (table[t][d]); zeroes the per-key
//                     totals (key_total) for radix_count_hi, sets the scans' ticket to 0;
//   radix_scan        (low digits) in place, table[t][d] <- sum_{t' < t} table[t'][d], and (last CTA)
//                     digit_off[d] = sum_{d' < d} (pairs of digit d');
//   radix_scatter_lo  a tile's pairs in stable low-digit order in shared memory, then to tmp (key, i) at
//                     digit_off[d] + table[t][d] + their rank among the tile's pairs of digit d;
//   radix_count_hi    the same count over tmp's tiles and high digits, and the per-key totals (a shared-memory
//                     histogram per tile: tmp runs low digit after low digit, so a tile holds few keys; global
//                     atomics of the nonzero ones);
//   radix_scan        (high digits) as above, then seg_off and tile_cum from the per-key totals;
//   radix_scatter_hi  tmp's tiles in stable high-digit order to pairs[pos] = i (sorted_keys[pos] = key).
// Traffic per pair: topk read twice (8 B), tmp written (8 B), tmp read (12 B), pairs written (8 B; + 4 B of sorted
// keys): ~36 B against the one-pass sort's 16, in runs instead of single stores, plus 8 B per (tile, digit) entry.

namespace moba_pairs {

constexpr int kRadixBins = 128;        // RADIX_BINS: the most values of a digit (keys below 2^14)
constexpr int kRadixThreads = 512;     // RADIX_THREADS: the scatters' CTAs, 16 pairs per lane
constexpr int kRadixRounds = 16;
constexpr int kRadixTile = kRadixThreads * kRadixRounds;  // RADIX_TILE: pairs per tile of every radix launch
constexpr int kRadixCountThreads = kRadixTile / kPairsRounds;  // RADIX_COUNT_THREADS: 16 pairs each
constexpr int kRadixScanThreads = 1024;  // RADIX_SCAN_THREADS: one CTA per digit value; the last one's key offsets
constexpr int kRadixWarps = kRadixThreads / 32;
static_assert(kRadixWarps * kRadixBins == 4 * kRadixThreads, "the start scan takes four (digit, warp) entries a thread");
constexpr int kRadixPerDigit = kRadixWarps / 4;  // threads of the start scan per digit
static_assert(kRadixBins <= 128, "digits of at most 7 bits (the ballots of radix_stage)");

// The tile's pairs (key[r] their keys, kNoKey where absent; value(r) their pair indices) in stable digit order in
// shared memory: skey / sval[p] for p below the return value (the tile's pair count), and
// adj[d] = digit_off[d] + row[d] - (the tile's first local position of digit d), so that local position p of digit
// d goes to adj[d] + p. Warp w holds the tile's pairs 32 kRounds w .. 32 kRounds (w + 1) - 1, lane l those
// 32 r + l: a warp ranks equal digits round by round into its row of counts, and the starts come from one scan over
// (digit, warp). The lanes of equal digits come from one ballot per digit bit (kBallot) or from __match_any_sync:
// the match waits in the shared-memory pipe with the ranking's loads and stores, and measured (H100, per launch)
// the ballots rank the low digit 1.16-1.18x faster, while the high digit's ranking, over pairs already in low-digit
// order, ran 0.83-1.09x as fast with them as with the match, so only the low-digit pass takes them. Ends with a
// barrier.
template <int kRounds, bool kBallot, typename Value>
__device__ __forceinline__ int radix_stage(int (&key)[kRounds], Value value, int shift, int mask, int n_bins,
                                           const int* row, const int* digit_off, int* smem, int* warp_tot,
                                           int* n_valid) {
  int digit_bits = 0;  // bits of the largest digit (0 for one value)
  while ((1 << digit_bits) < n_bins) ++digit_bits;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int* wtab = smem;                              // [kRadixWarps][kRadixBins]
  int* adj = wtab + kRadixWarps * kRadixBins;    // [kRadixBins]
  int* skey = adj + kRadixBins;                  // [kRadixTile]
  int* sval = skey + kRadixTile;                 // [kRadixTile]
  for (int v = tid; v < kRadixWarps * kRadixBins; v += kRadixThreads) wtab[v] = 0;
  __syncthreads();
  int* mine = wtab + warp * kRadixBins;
  const unsigned lower = (1u << lane) - 1u;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {  // key[r] becomes key << 16 | (rank among the warp's pairs of its digit)
    const int d = key[r] == kNoKey ? -1 : (key[r] >> shift) & mask;
    unsigned same;
    if (kBallot) {
      same = __ballot_sync(0xffffffffu, d >= 0);
#pragma unroll
      for (int b = 0; b < 7; ++b) {  // kRadixBins <= 128: at most 7 bits
        if (b < digit_bits) {
          const bool bit = (d >> b) & 1;
          const unsigned m = __ballot_sync(0xffffffffu, bit);
          same &= bit ? m : ~m;
        }
      }
    } else {
      same = __match_any_sync(0xffffffffu, d);
    }
    const int old = d >= 0 ? mine[d] : 0;
    __syncwarp();
    if (d >= 0 && (same & lower) == 0) mine[d] = old + __popc(same);
    __syncwarp();
    if (d >= 0) key[r] = (key[r] << 16) | (old + __popc(same & lower));
  }
  __syncthreads();
  // starts in (digit, warp) order: thread tid has digit tid / P, warps 4 (tid % P) .. 4 (tid % P) + 3 (P threads
  // per digit)
  const int d0 = tid / kRadixPerDigit, w0 = (tid % kRadixPerDigit) * 4;
  int c[4], sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    c[j] = d0 < n_bins ? wtab[(w0 + j) * kRadixBins + d0] : 0;
    sum += c[j];
  }
  int run = block_exclusive_scan(sum, warp_tot);  // ends with a barrier: every count is read
  if (d0 < n_bins) {
    if (w0 == 0) adj[d0] = digit_off[d0] + row[d0] - run;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wtab[(w0 + j) * kRadixBins + d0] = run;
      run += c[j];
    }
  }
  if (tid == kRadixThreads - 1) *n_valid = run;  // past the last digit: the tile's pair count
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    if (key[r] == kNoKey) continue;
    const int k = key[r] >> 16;
    const int p = mine[(k >> shift) & mask] + (key[r] & 0xffff);
    skey[p] = k;
    sval[p] = value(r);
  }
  __syncthreads();
  return *n_valid;
}

}  // namespace moba_pairs

// The low digit's counts per tile (kRadixCountThreads threads, kPairsRounds pairs each: pair first + r threads + tid).
extern "C" __global__ void __launch_bounds__(moba_pairs::kRadixCountThreads) moba_pairs_radix_count_lo(
    const int* topk, int* table, int* key_total, unsigned* ticket, int seqlen, int heads, int top_k, int n_blocks,
    int batch_index, int h0, int n_heads_c, int t0, int n_q, int group, int lo_bits) {
  using namespace moba_pairs;
  __shared__ int hist[kRadixBins];
  const int n_seg = (n_heads_c / group) * n_blocks, n_keys = n_seg + 1;
  const int n_pairs = n_heads_c * n_q * top_k;
  const int tid = threadIdx.x, bins = 1 << lo_bits;
  if (blockIdx.x == 0 && tid == 0) *ticket = 0u;  // the scans count on it (a kernel boundary orders the store)
  for (int s = blockIdx.x * kRadixCountThreads + tid; s < n_keys; s += gridDim.x * kRadixCountThreads)
    key_total[s] = 0;  // radix_count_hi's atomics, two launches on
  for (int s = tid; s < bins; s += kRadixCountThreads) hist[s] = 0;
  __syncthreads();
  int key[kPairsRounds];
  pair_keys<kPairsRounds, kCountBatch>(key, topk, blockIdx.x * kRadixTile + tid, kRadixCountThreads, n_pairs, n_seg,
                                       seqlen, heads, top_k, n_blocks, batch_index, h0, t0, n_q, group);
#pragma unroll
  for (int r = 0; r < kPairsRounds; ++r)
    if (key[r] != kNoKey) atomicAdd(hist + (key[r] & (bins - 1)), 1);
  __syncthreads();
  for (int s = tid; s < bins; s += kRadixCountThreads) table[blockIdx.x * bins + s] = hist[s];
}

// The high digit's counts per tile of tmp, and the per-key totals (4 n_keys bytes of dynamic shared memory).
extern "C" __global__ void __launch_bounds__(moba_pairs::kRadixCountThreads) moba_pairs_radix_count_hi(
    const int* tmp_keys, int n_pairs, int n_keys, int lo_bits, int hi_bins, int* table, int* key_total) {
  using namespace moba_pairs;
  __shared__ int hist[kRadixBins];
  MOBA_PAIRS_DYNAMIC_SMEM(smem);
  int* per_key = reinterpret_cast<int*>(smem);
  const int tid = threadIdx.x;
  for (int s = tid; s < n_keys; s += kRadixCountThreads) per_key[s] = 0;
  for (int s = tid; s < hi_bins; s += kRadixCountThreads) hist[s] = 0;
  const int first = blockIdx.x * kRadixTile + tid;
  int key[kPairsRounds];
#pragma unroll
  for (int r = 0; r < kPairsRounds; ++r) {
    const int e = first + r * kRadixCountThreads;
    key[r] = e < n_pairs ? tmp_keys[e] : kNoKey;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kPairsRounds; ++r) {
    if (key[r] == kNoKey) continue;
    atomicAdd(hist + (key[r] >> lo_bits), 1);
    atomicAdd(per_key + key[r], 1);
  }
  __syncthreads();
  for (int s = tid; s < hi_bins; s += kRadixCountThreads) table[blockIdx.x * hi_bins + s] = hist[s];
  for (int s = tid; s < n_keys; s += kRadixCountThreads)
    if (per_key[s] != 0) atomicAdd(key_total + s, per_key[s]);
}

// Column d = blockIdx.x of the (n_tiles, n_cols) count table scanned in place over the tiles; the last CTA (the
// ticket, which it leaves at 0) writes digit_off[0 .. n_cols) and, when key_total is not null, seg_off and tile_cum
// (offsets_from_totals). digit_off holds 2 n_cols ints: the column totals go to its second half.
extern "C" __global__ void __launch_bounds__(moba_pairs::kRadixScanThreads) moba_pairs_radix_scan(
    int* table, int n_tiles, int n_cols, int* digit_off, unsigned* ticket, const int* key_total, int n_keys,
    int n_seg, int rows_per_unit, long long* seg_off, long long* tile_cum) {
  using namespace moba_pairs;
  __shared__ int warp_tot[32];
  __shared__ int is_last;
  const int d = blockIdx.x, tid = threadIdx.x;
  const int per = (n_tiles + kRadixScanThreads - 1) / kRadixScanThreads;
  const int t_begin = min(tid * per, n_tiles), t_end = min(t_begin + per, n_tiles);
  int sum = 0;
  for (int t = t_begin; t < t_end; ++t) sum += table[static_cast<long long>(t) * n_cols + d];
  int run = block_exclusive_scan(sum, warp_tot);
  for (int t = t_begin; t < t_end; ++t) {
    int* e = table + static_cast<long long>(t) * n_cols + d;
    const int v = *e;
    *e = run;
    run += v;
  }
  if (tid == kRadixScanThreads - 1) digit_off[n_cols + d] = run;  // the last range ends at the column's total
  if (!arrive_last(ticket, &is_last)) return;
  const int total = tid < n_cols ? *static_cast<volatile const int*>(digit_off + n_cols + tid) : 0;
  const int off = block_exclusive_scan(total, warp_tot);
  if (tid < n_cols) digit_off[tid] = off;
  if (key_total != nullptr) offsets_from_totals(key_total, n_keys, n_seg, rows_per_unit, seg_off, tile_cum, warp_tot);
  if (tid == 0) *ticket = 0u;  // ready for the next scan
}

// Dynamic shared memory of both scatters (RADIX_SMEM bytes in _pairs.py): kRadixWarps kRadixBins + kRadixBins +
// 2 kRadixTile ints (the warps' digit counts, adj, the tile's keys and indices; radix_stage's layout).

// The chunk's pairs in stable low-digit order to tmp_keys / tmp_idx (two CTAs per SM).
extern "C" __global__ void __launch_bounds__(moba_pairs::kRadixThreads, 2) moba_pairs_radix_scatter_lo(
    const int* topk, const int* table, const int* digit_off, int* tmp_keys, int* tmp_idx, int seqlen, int heads,
    int top_k, int n_blocks, int batch_index, int h0, int n_heads_c, int t0, int n_q, int group, int lo_bits) {
  using namespace moba_pairs;
  __shared__ int warp_tot[32];
  __shared__ int n_valid;
  MOBA_PAIRS_DYNAMIC_SMEM(smem);
  int* s = reinterpret_cast<int*>(smem);
  const int n_seg = (n_heads_c / group) * n_blocks;
  const int n_pairs = n_heads_c * n_q * top_k;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, bins = 1 << lo_bits;
  const int first = blockIdx.x * kRadixTile + warp * 32 * kRadixRounds + lane;
  int key[kRadixRounds];
  pair_keys<kRadixRounds, kCountBatch>(key, topk, first, 32, n_pairs, n_seg, seqlen, heads, top_k, n_blocks,
                                       batch_index, h0, t0, n_q, group);
  const int n = radix_stage<kRadixRounds, true>(key, [&](int r) { return first + 32 * r; }, 0, bins - 1, bins,
                                                table + blockIdx.x * bins, digit_off, s, warp_tot, &n_valid);
  const int* adj = s + kRadixWarps * kRadixBins;
  const int* skey = adj + kRadixBins;
  const int* sval = skey + kRadixTile;
  for (int p = tid; p < n; p += kRadixThreads) {
    const int k = skey[p];
    const int g = adj[k & (bins - 1)] + p;
    tmp_keys[g] = k;
    tmp_idx[g] = sval[p];
  }
}

// tmp's pairs in stable high-digit order to their places in the lists (two CTAs per SM).
extern "C" __global__ void __launch_bounds__(moba_pairs::kRadixThreads, 2) moba_pairs_radix_scatter_hi(
    const int* tmp_keys, const int* tmp_idx, const int* table, const int* digit_off, long long* pairs,
    int* sorted_keys, int n_pairs, int lo_bits, int hi_bins) {
  using namespace moba_pairs;
  __shared__ int warp_tot[32];
  __shared__ int n_valid;
  MOBA_PAIRS_DYNAMIC_SMEM(smem);
  int* s = reinterpret_cast<int*>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int first = blockIdx.x * kRadixTile + warp * 32 * kRadixRounds + lane;
  int key[kRadixRounds], idx[kRadixRounds];
#pragma unroll
  for (int r = 0; r < kRadixRounds; ++r) {
    const int e = first + 32 * r;
    key[r] = e < n_pairs ? tmp_keys[e] : kNoKey;
    idx[r] = e < n_pairs ? tmp_idx[e] : 0;
  }
  const int n = radix_stage<kRadixRounds, false>(key, [&](int r) { return idx[r]; }, lo_bits, 0x7fff, hi_bins,
                                                 table + blockIdx.x * hi_bins, digit_off, s, warp_tot, &n_valid);
  const int* adj = s + kRadixWarps * kRadixBins;
  const int* skey = adj + kRadixBins;
  const int* sval = skey + kRadixTile;
  for (int p = tid; p < n; p += kRadixThreads) {
    const int k = skey[p];
    const int g = adj[k >> lo_bits] + p;
    pairs[g] = sval[p];
    if (sorted_keys != nullptr) sorted_keys[g] = k;
  }
}

// The lists of a chunk over whole sequences gathered from lists kept by earlier chunks (the forward's, for the
// backward, whose chunks split the heads and queries differently). Segment s is the concatenation of n_pieces
// kept segments in order (a kept chunk may hold part of a head's queries: its pieces then come in query order);
// piece p's seg_off entry is kept[table[p n_seg + s]] (its end kept[table[(P + p) n_seg + s]]), its pairs start at
// kept[table[(2 P + p) n_seg + s]], and every pair index moves by table[(3 P + p) n_seg + s] (P = n_pieces; the
// query heads and queries between the two chunks' first pairs, times top_k). It goes to dst_pairs[dst_off[s] ..],
// dst_off the scan of the sizes. One CTA per segment; one read and one write of 8 B per pair, against the sort's
// topk reads, count tables and scatter.
extern "C" __global__ void __launch_bounds__(256) moba_pairs_gather(const long long* kept, const long long* table,
                                                                     const long long* dst_off, long long* dst_pairs,
                                                                     int n_seg, int n_pieces) {
  const int s = blockIdx.x;
  if (s >= n_seg) return;
  const long long field = static_cast<long long>(n_pieces) * n_seg;  // between the table's four fields
  long long* dst = dst_pairs + dst_off[s];
  for (int p = 0; p < n_pieces; ++p) {
    const long long* e = table + static_cast<long long>(p) * n_seg + s;
    const long long start = kept[e[0]], n = kept[e[field]] - start;
    const long long* src = kept + e[2 * field] + start;
    const long long shift = e[3 * field];
    for (long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i] + shift;
    dst += n;
  }
}

// The backward's CTA order, longest first (mobalab.kernels._cuda_backward.longest_first): order[] lists the chunk's
// n_seg segments by descending tile count ceil(rows / rows_per_tile) (capped at kOrderKeys - 1), equal counts in
// segment order. A stable counting sort in one CTA of kOrderKeys threads: key counts by shared-memory atomics,
// each key's first position (the counts of larger keys: an exclusive scan with thread t on key kOrderKeys - 1 - t),
// then one warp places the segments in order, 32 at a time, ranking equal keys with __match_any_sync. Dynamic
// shared memory: 4 n_seg bytes of keys. One launch of a few microseconds where torch's argsort took four
// (differences, a radix sort of a few thousand keys, a conversion) and ~30 us at 8K and 16K.
constexpr int kOrderKeys = 1024;  // ORDER_THREADS in _pairs.py: one thread per key

extern "C" __global__ void __launch_bounds__(kOrderKeys) moba_pairs_longest_first(const long long* seg_off, int n_seg,
                                                                                  int rows_per_tile, int* order) {
  __shared__ int start[kOrderKeys];
  __shared__ int warp_tot[32];
  MOBA_PAIRS_DYNAMIC_SMEM(smem);
  int* keys = reinterpret_cast<int*>(smem);
  const int tid = threadIdx.x;
  start[tid] = 0;
  __syncthreads();
  for (int s = tid; s < n_seg; s += kOrderKeys) {
    const long long tiles = (seg_off[s + 1] - seg_off[s] + rows_per_tile - 1) / rows_per_tile;
    keys[s] = static_cast<int>(min(tiles, static_cast<long long>(kOrderKeys - 1)));
    atomicAdd(&start[keys[s]], 1);
  }
  __syncthreads();
  const int key = kOrderKeys - 1 - tid;
  const int first = moba_pairs::block_exclusive_scan(start[key], warp_tot);  // ends with a barrier: every count is read
  start[key] = first;
  __syncthreads();
  if (tid >= 32) return;
  for (int base = 0; base < n_seg; base += 32) {
    const int s = base + tid;
    const bool on = s < n_seg;
    const int k = on ? keys[s] : -1 - tid;  // lanes past the end: keys of their own
    const unsigned same = __match_any_sync(0xffffffffu, k);
    if (on) order[start[k] + __popc(same & ((1u << tid) - 1u))] = s;
    __syncwarp();
    if (on && (same >> tid) == 1u) start[k] += __popc(same);  // the key's last lane moves its cursor
    __syncwarp();
  }
}

// Routing rebased to the blocks first .. first + n_blocks - 1 (context parallelism: a kernel call over one key
// segment sees its blocks as 0 .. n_blocks - 1): out[i] = topk[i] - first where that lies in [0, n_blocks),
// else -1. n_vec 16-byte vectors (4 slots each; the caller passes n = 4 n_vec slots, 16-byte aligned), grid-
// stride. One read and one write of 4 bytes per slot, where the torch expression moved ~8 passes of it.
extern "C" __global__ void __launch_bounds__(256) moba_topk_rebase(const int4* topk, int4* out, long long n_vec,
                                                                    int first, int n_blocks) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    int4 v = topk[i];
    // unsigned compare: j < 0 wraps past n_blocks
    v.x = static_cast<unsigned>(v.x - first) < static_cast<unsigned>(n_blocks) ? v.x - first : -1;
    v.y = static_cast<unsigned>(v.y - first) < static_cast<unsigned>(n_blocks) ? v.y - first : -1;
    v.z = static_cast<unsigned>(v.z - first) < static_cast<unsigned>(n_blocks) ? v.z - first : -1;
    v.w = static_cast<unsigned>(v.w - first) < static_cast<unsigned>(n_blocks) ? v.w - first : -1;
    out[i] = v;
  }
}
