// MoBA routing stage 2 on Hopper warpgroup MMAs (wgmma, sm_90a): the fused top-k of topk.cu (same contract,
// same tie order: topk.cuh) with the score tile S = Q C^T computed by asynchronous wgmma from 128-byte-swizzled
// shared memory (wgmma.cuh) and scanned where the MMA leaves it, in registers, while the tensor cores multiply the
// next centroid chunk.
//
// One CTA = (query tile of TKW_BM = 128 rows, query head h, batch b), two warpgroups (256 threads); warpgroup w
// owns rows 64 w .. 64 w + 63 (one m64). Centroid chunks of TKW_BN = 64 blocks are streamed in descending order
// (double-buffered cp.async): the chunk's hi and lo halves are stacked into one K-major B tile of 128 rows (hi rows
// 0..63, lo rows 64..127), so one wgmma m64n128k16 per k-step yields q.hi in accumulator columns 0..63 and q.lo in
// 64..127, and S = acc[i] + acc[i + 32] (float i + 32 of a 64x128 accumulator is column + 64 of float i:
// wgmma_acc_col). Both sums are fp32 accumulations of the products of the inputs with the split fp32 centroid, as
// in the mma.sync kernel; they differ from it only in the fp32 rounding order, i.e. at near-ties.
//
// Why the scores stay in registers. An earlier form of this kernel (256 rows per CTA) stored S to a shared-memory
// score tile and scanned row r in thread r, under the next chunk's wgmma. Timed on an H200 (clock64 probes of one
// warpgroup issuing 16 wgmma m64n128k16 from shared memory), the scan and the MMA hardly overlap: a warpgroup's
// wgmma issue blocks for ~45% of its MMA time, and a warp's shared-memory loads and stores take ~3x as long while
// wgmma reads its operands from shared memory (~96 of 128 bytes per clock at m64n128k16): 128 KB of score stores
// and loads per chunk under the MMA took as long as after it. At 512K that kernel took 43 ms, the sum of its MMAs
// (~20 ms), copies and barriers (~10) and stores and scans (~13). Here the MMA's operand reads are the only
// shared-memory traffic of a chunk besides its copy, and the scan is register arithmetic.
//
// The scan. Thread t of a warpgroup holds, per chunk, 16 scores of each of two rows (R0 = 16 (t / 32) + (t % 32) / 4
// and R0 + 8): blocks j0 + 8 nt + 2 (t % 4) + e, nt < 8, e < 2, the m16n8 accumulator layout; the four threads of
// a quad hold the 64 columns of the same two rows. Each thread keeps one register list per row (TopkRegList: the
// best list_cap of the scores it has seen, a new one strictly above its last entry) over its own columns, visited in
// descending block order (chunks, then nt, then e), so a tie keeps the higher block as in topk.cuh. Scores are
// offered only when strictly above the largest of the quad's four list thresholds, exchanged once per chunk (two
// shuffles per row): a thread's last entry has list_cap scores of the row at or above it, every one from an earlier
// chunk and so of a higher block, so a score at or below it cannot be among the row's best list_cap (an equal
// score loses the tie). While a thread's list is not yet full, the list_cap-th largest of its own 16 candidates of
// the chunk (topk_cap_th_largest) bounds it instead, through topk_below so that scores equal to it pass. The row's
// selection is the best list_cap of the union of the quad's four lists, every one of which holds each of its
// thread's columns among the row's best: at the end the lists go to shared memory as 64-bit keys (ordered score,
// block) and thread r < 128 merges row r's four.
//
// Pipeline per chunk (one CTA barrier): wait for S(c) -> wait for the own copies of chunk c - 1 -> CTA barrier
// (chunk c - 1 visible to wgmma, chunk c's buffer free: every thread has passed its wait for chunk c's wgmma) ->
// issue the wgmmas of chunk c - 1 into the other accumulator set (asynchronous), cp.async of chunk c - 2 into
// chunk c's buffer -> scan S(c). Two accumulator sets alternate (the loop runs chunks in pairs, so that each set's
// role is fixed in the code: ptxas serialises wgmmas whose accumulators ordinary code writes in between, C7517).
//
// Work and bytes per chunk (D = 128, one CTA): MMA 128 rows x 128 stacked columns x 128 x 2 = 4.2 MFLOP (16 wgmma
// m64n128k16 of 262 KFLOP), ~1.0 K clocks at the dense 16-bit rate (~4 KFLOP/clk/SM). Shared memory: wgmma operand
// reads 16 x (A 2 KB + B 4 KB) = 96 KB (~0.75 K clocks at 128 B/clk), cp.async fills 32 KB. Global (L2) reads
// 64 x 2 x 256 B = 32 KB of centroids per 128 rows (128 FLOP/B); Q 32 KB once per CTA. Scan per thread and chunk:
// 32 FADD (the S sums), 32 subtract-and-shift threshold masks, 4 shuffles, ~50 instructions per offer.
// Registers per thread: two accumulator sets 2 x 64 floats, two row lists 2 (2 LCAP + 1), scan temporaries
// (ptxas, no spills), __launch_bounds__(256, 1). Shared memory (dynamic, 1024-byte aligned): Q 128 x D x 2 bytes
// (32 KB at D = 128), two stacked centroid chunks 2 x 128 x D x 2 (64 KB), + 1 KB alignment slack = 97 KB at
// D = 128, 49 KB at D = 64; the lists' merge reuses it (128 x 4 x LCAP x 8 bytes: 32 KB at LCAP 8, 64 KB at 16,
// which sets the size at D = 64 and LCAP 16; wgmma_topk_shared_bytes in _cuda_routing.py).
//
// Head dims 64 and 128 (one or two 64-element K blocks of the swizzled layout), list tiers 8 and 16; other
// shapes use topk.cu (the launch plan in _cuda_routing.py decides).

#include "topk.cuh"
#include "wgmma.cuh"

#define TKW_BM 128       // query rows per CTA (two warpgroups of one m64 each)
#define TKW_BN 64        // centroids per streamed chunk (the stacked B tile has 2 TKW_BN rows: hi, lo)
#define TKW_THREADS 256  // two warpgroups
#define TKW_ROWS 64      // rows of one wgmma (m64)
#ifndef MOBA_TKW_SINGLE
#define MOBA_TKW_SINGLE 0
#endif
#ifndef MOBA_TKW_JOINT
#define MOBA_TKW_JOINT 0
#endif
// Floats of one accumulator set: q.hi and q.lo in columns of their own (64 x 128), or summed in one (64 x 64)
#define TKW_ACC (MOBA_TKW_JOINT ? TKW_BN / 2 : TKW_BN)
// CTAs per SM by list tier: two of 128 registers with one accumulator set at tier 8, else one
#if MOBA_TKW_SINGLE || MOBA_TKW_JOINT
#define TKW_MIN_CTAS_8 2
#else
#define TKW_MIN_CTAS_8 1
#endif
#define TKW_MIN_CTAS_16 1

// The dynamic shared-memory declaration; the host emulation of the tests (tests/kernels/host_emulation) puts
// its own in place, with models of cp.async and wgmma.
#ifndef MOBA_TOPK_WG_SMEM
#define MOBA_TOPK_WG_SMEM(name) extern __shared__ __align__(1024) unsigned char name[]
#endif

#if MOBA_HAS_WGMMA
// Every copy of a thread has one chunk column and one swizzle (TopkCopyPattern, topk.cuh): a constant shared-memory
// step and one row index per copy (measured: the per-copy index arithmetic was ~30 instructions per cp.async, 13% of
// the kernel's instructions at 64K).
template <int D>
struct TopkWgCopy : TopkCopyPattern<D, TKW_THREADS, TKW_ROWS> {
    static_assert(TopkCopyPattern<D, TKW_THREADS, TKW_ROWS>::kFixed, "one swizzled column per thread");
};

// Centroid chunk `tile` (blocks tile * TKW_BN ..) into the stacked swizzled B tile at shared address buf: row
// r < TKW_BN is hi of block tile * TKW_BN + r, row TKW_BN + r its lo; blocks past the end are clamped to the
// last one (the scan never offers them).
template <typename T, int D>
__device__ __forceinline__ void topk_wg_load_centroids(unsigned buf, const T* __restrict__ hi,
                                                       const T* __restrict__ lo, int tile, int n_blocks,
                                                       int tid) {
    using C = TopkWgCopy<D>;
    const int r0 = tid / C::CH, c = tid % C::CH;
    const unsigned dst = buf + moba::sw128_offset(r0, c * 8, 2 * TKW_BN);
    const int j0 = tile * TKW_BN + r0;
#pragma unroll
    for (int k = 0; k < TKW_BN / C::R; ++k) {
        const long long src = (long long)min(j0 + k * C::R, n_blocks - 1) * D + c * 8;
        cp_async16(dst + k * C::R * moba::SW128_ROW_BYTES, hi + src);
        cp_async16(dst + (TKW_BN + k * C::R) * moba::SW128_ROW_BYTES, lo + src);
    }
    cp_async_commit();
}

// The CTA's TKW_BM query rows (rows past the end clamped to the last query) into the per-m64 swizzled Q tiles at sq.
template <typename T, int D>
__device__ __forceinline__ void topk_wg_load_q(unsigned sq, const T* __restrict__ q, int b, int h, int t0, int seqlen,
                                               int heads, int tid) {
    using C = TopkWgCopy<D>;
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    const int r0 = tid / C::CH, c = tid % C::CH;
    const unsigned dst = sq + moba::sw128_offset(r0, c * 8, TKW_ROWS);
    const T* src = q + ((long long)b * seqlen * heads + h) * D + c * 8;
    const long long row_stride = (long long)heads * D;
#pragma unroll
    for (int k = 0; k < TKW_BM / C::R; ++k) {
        const int r = k * C::R;  // + r0
        cp_async16(dst + (r / TKW_ROWS) * QT_BYTES + (r % TKW_ROWS) * moba::SW128_ROW_BYTES,
                   src + min(t0 + r0 + r, seqlen - 1) * row_stride);
    }
}

// Issue (asynchronously, one commit group) the wgmmas of one chunk for this warpgroup's m64: acc = its Q rows x
// [hi; lo]^T, 64 x 128, D / 16 k-steps.
template <typename T, int D>
__device__ __forceinline__ void topk_wg_issue(float (&acc)[TKW_ACC], unsigned sq_wg, unsigned buf) {
    moba::wgmma_fence_operand(acc);
    moba::wgmma_fence();  // the accumulators were last read by ordinary instructions (the scan)
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const unsigned long long da = moba::wgmma_desc_sw128(sq_wg, ks, TKW_ROWS);
#if MOBA_TKW_JOINT
        // hi rows 0 .. TKW_BN - 1 and lo rows TKW_BN .. of the stacked tile into one 64 x 64 accumulator
        moba::wgmma_ss<T>(acc, da, moba::wgmma_desc_sw128(buf, ks, 2 * TKW_BN), ks > 0);
        moba::wgmma_ss<T>(acc, da, moba::wgmma_desc_sw128(buf + TKW_BN * moba::SW128_ROW_BYTES, ks, 2 * TKW_BN), 1);
#else
        moba::wgmma_ss<T>(acc, da, moba::wgmma_desc_sw128(buf, ks, 2 * TKW_BN), ks > 0);
#endif
    }
    moba::wgmma_commit_group();
}
#endif

// s[b] for a run-time b < 16 without a local-memory array: a select tree on the bits of b.
__device__ __forceinline__ float topk_wg_pick16(const float (&s)[16], int b) {
    float t8[8], t4[4], t2[2];
#pragma unroll
    for (int i = 0; i < 8; ++i) t8[i] = (b & 1) ? s[2 * i + 1] : s[2 * i];
#pragma unroll
    for (int i = 0; i < 4; ++i) t4[i] = (b & 2) ? t8[2 * i + 1] : t8[2 * i];
#pragma unroll
    for (int i = 0; i < 2; ++i) t2[i] = (b & 4) ? t4[2 * i + 1] : t4[2 * i];
    return (b & 8) ? t2[1] : t2[0];
}

// One row's 16 scores of a chunk held by this thread (rsel: accumulator row R0 or R0 + 8; blocks j0 + 2 qc + 8 nt + e
// at s[2 nt + e]) offered to its list, in descending block order. Candidates: blocks j < lim, i.e. column offsets
// 8 nt + e < nv = lim - j0 - 2 qc. quad_thr: the quad's largest list threshold at the chunk's start (see the header).
template <typename List>
__device__ __forceinline__ void topk_wg_scan_row(List& list, const float (&acc)[TKW_ACC], int rsel, int j0, int nv,
                                                 int qc, float quad_thr) {
    if (nv <= 0) return;
    float s[16];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int i = 4 * nt + 2 * rsel + e;  // q.hi in column c, q.lo in column c + TKW_BN: float i + 32
            if constexpr (MOBA_TKW_JOINT) s[2 * nt + e] = acc[i];
            else s[2 * nt + e] = acc[i] + acc[i + TKW_ACC / 2];
        }
    unsigned valid = 0xffffu;
    if (nv < 8 * 7 + 2) {
        valid = 0u;
#pragma unroll
        for (int b = 0; b < 16; ++b) valid |= (unsigned)(8 * (b >> 1) + (b & 1) < nv) << b;
    }
    float thr = fmaxf(list.threshold(), quad_thr);
    if (list.threshold() == moba::neg_inf()) {
        // Not yet full: the cap-th largest of this thread's own candidates of the chunk bounds the row's cap-th best.
        float g[16];
#pragma unroll
        for (int b = 0; b < 16; ++b) g[b] = ((valid >> b) & 1u) && s[b] > moba::neg_inf() ? s[b] : moba::neg_inf();
        thr = fmaxf(thr, topk_below(topk_cap_th_largest(g, list.cap)));
    }
    // x > thr as the sign bit of thr - x (topk_scan_word_lim): a spurious bit costs an offer that changes nothing.
    unsigned m = 0u;
#pragma unroll
    for (int b = 15; b >= 0; --b) m = (m << 1) | (__float_as_uint(thr - s[b]) >> 31);
    m &= valid;
    const int jq = j0 + 2 * qc;
    while (m != 0u) {
        const int b = 31 - __clz(m);
        m ^= 1u << b;
        list.offer(topk_wg_pick16(s, b), jq + 8 * (b >> 1) + (b & 1));
    }
}

// A lower bound on the row's list_cap-th best score from the quad's four lists at a chunk's start (all 32 lanes: the
// shuffles are outside divergent code): the largest of the four last entries (each has list_cap listed scores at or
// above it), and the smallest of the four r-th bests, r = ceil(list_cap / 4) (4 r >= list_cap listed scores at or
// above it). Every listed score comes from an earlier chunk, of a higher block, so a score of this chunk equal to
// the bound loses the tie: strictly above it is the filter.
template <int LCAP>
__device__ __forceinline__ float topk_wg_quad_bound(const TopkRegList<LCAP>& list) {
    const int pos = LCAP - list.cap + (list.cap + 3) / 4 - 1;  // the r-th best's place (sentinels come first)
    float vr = moba::neg_inf();
#pragma unroll
    for (int i = 0; i < LCAP; ++i) vr = i == pos ? list.v[i] : vr;
    float last = list.threshold();
    last = fmaxf(last, __shfl_xor_sync(0xffffffffu, last, 1));
    vr = fminf(vr, __shfl_xor_sync(0xffffffffu, vr, 1));
    last = fmaxf(last, __shfl_xor_sync(0xffffffffu, last, 2));
    vr = fminf(vr, __shfl_xor_sync(0xffffffffu, vr, 2));
#ifndef MOBA_TKW_BOUND
#define MOBA_TKW_BOUND 1
#endif
    return MOBA_TKW_BOUND ? fmaxf(last, vr) : last;
}

// (score, block) as one 64-bit key whose unsigned order is the ranking (score descending, then block descending);
// an unfilled entry (block < 0) is 0, below every listed pair.
__device__ __forceinline__ unsigned long long topk_wg_key(float v, int j) {
    const unsigned u = __float_as_uint(v);
    const unsigned o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return j < 0 ? 0ull : ((unsigned long long)o << 32) | (unsigned)j;
}

template <int LCAP>
__device__ __forceinline__ void topk_wg_put_list(const TopkRegList<LCAP>& list, unsigned long long* dst) {
#pragma unroll
    for (int i = 0; i < LCAP; ++i)
        if (i >= LCAP - list.cap) dst[i - (LCAP - list.cap)] = topk_wg_key(list.v[i], list.j[i]);
}

template <typename T, int D, bool CAUSAL, int LCAP>
__device__ __forceinline__ void topk_wg_body(const T* __restrict__ q, const T* __restrict__ chi,
                                             const T* __restrict__ clo, int* __restrict__ out, int seqlen,
                                             int heads, int kv_heads, int block_size, int n_blocks, int top_k,
                                             int q_pos0, int fold_blocks) {
#if MOBA_HAS_WGMMA
    static_assert(D == 64 || D == 128, "head dims of the wgmma router");
    static_assert(LCAP == 8 || LCAP == 16, "register-list tiers only");
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    constexpr unsigned C_BYTES = moba::sw128_tile_bytes(2 * TKW_BN, D);
    MOBA_TOPK_WG_SMEM(topk_wg_smem);
    // Swizzle patterns start 1024-byte aligned (wgmma.cuh); the launch adds 1024 bytes of slack.
    const unsigned smem0 = smem_u32(topk_wg_smem);
    const unsigned sq = (smem0 + moba::SW128_PATTERN_BYTES - 1) & ~(moba::SW128_PATTERN_BYTES - 1);
    const unsigned sc = sq + (TKW_BM / TKW_ROWS) * QT_BYTES;
    unsigned long long* sL = reinterpret_cast<unsigned long long*>(topk_wg_smem + (sq - smem0));

    const int tid = threadIdx.x, lane = tid & 31;
    const int wg = tid >> 7, qc = lane & 3;
    const TopkTile cta = topk_tile<CAUSAL, TKW_BM, TKW_BN>(seqlen, heads, kv_heads, block_size, n_blocks, top_k,
                                                           q_pos0);
    const int h = cta.h, b = cta.b, g = cta.g, t0 = cta.t0, list_cap = cta.list_cap, n_tiles = cta.n_tiles;

    // This thread's two rows (the m16n8 accumulator layout of its warpgroup's m64): r0 and r0 + 8.
    const int r0 = TKW_ROWS * wg + 16 * ((tid & 127) >> 5) + (lane >> 2);
    const T* hi = chi + ((long long)b * kv_heads + g) * n_blocks * D;
    const T* lo = clo + ((long long)b * kv_heads + g) * n_blocks * D;
    const unsigned sq_wg = sq + wg * QT_BYTES;  // this warpgroup's m64 Q tile
    auto buf = [&](int tile) { return sc + (tile & 1) * C_BYTES; };
    // The rows' candidates are the blocks j < lim (causal: before the own block; else every block); rows past the
    // end have none.
    auto row_lim = [&](int r) {
        const int t = t0 + r;
        return t >= seqlen ? 0 : CAUSAL ? (q_pos0 + t) / block_size : n_blocks;
    };
    const int lim0 = row_lim(r0), lim1 = row_lim(r0 + 8);

    typename TopkListFor<LCAP>::type list0, list1;
    list0.init(list_cap);
    list1.init(list_cap);
    float acc_a[TKW_ACC];
#if !MOBA_TKW_SINGLE
    float acc_b[TKW_ACC];
#endif  // two sets: q.hi in columns 0 .. TKW_BN - 1, q.lo in TKW_BN .. 2 TKW_BN - 1

#if MOBA_TKW_SINGLE
    // One accumulator set: chunk c's wgmmas, their wait and its scan in turn; the MMAs of the SM's other CTA run under
    // this one's scan. Chunk c - 1's copy runs under chunk c's MMA and scan.
    if (n_tiles > 0) {
        topk_wg_load_q<T, D>(sq, q, b, h, t0, seqlen, heads, tid);
        topk_wg_load_centroids<T, D>(buf(n_tiles - 1), hi, lo, n_tiles - 1, n_blocks, tid);  // group: Q + chunk
    }
    for (int tile = n_tiles - 1; tile >= 0; --tile) {
        cp_async_wait<0>();
        moba::fence_proxy_async_shared();
        __syncthreads();  // chunk tile visible to wgmma; chunk tile + 1's MMAs complete, so its buffer is free
        if (tile >= 1) topk_wg_load_centroids<T, D>(buf(tile - 1), hi, lo, tile - 1, n_blocks, tid);
        topk_wg_issue<T, D>(acc_a, sq_wg, buf(tile));
        moba::wgmma_wait_group<0>();
        moba::wgmma_fence_operand(acc_a);
        const float t0q = topk_wg_quad_bound(list0), t1q = topk_wg_quad_bound(list1);
        const int j0 = tile * TKW_BN;
        topk_wg_scan_row(list0, acc_a, 0, j0, lim0 - j0 - 2 * qc, qc, t0q);
        topk_wg_scan_row(list1, acc_a, 1, j0, lim1 - j0 - 2 * qc, qc, t1q);
        __syncwarp();  // the scans diverge per lane; wgmma (next chunk) is .aligned
    }
#else
    if (n_tiles > 0) {
        topk_wg_load_q<T, D>(sq, q, b, h, t0, seqlen, heads, tid);
        topk_wg_load_centroids<T, D>(buf(n_tiles - 1), hi, lo, n_tiles - 1, n_blocks, tid);  // group: Q + chunk
        if (n_tiles > 1) {
            topk_wg_load_centroids<T, D>(buf(n_tiles - 2), hi, lo, n_tiles - 2, n_blocks, tid);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        moba::fence_proxy_async_shared();  // cp.async data -> visible to wgmma (async proxy) after the barrier
        __syncthreads();
        topk_wg_issue<T, D>(acc_a, sq_wg, buf(n_tiles - 1));
    }

    // One chunk: collect S(tile) in `cur`, start the wgmmas of chunk tile - 1 into `nxt` (`next`), scan `cur`.
    auto step = [&](float (&cur)[TKW_ACC], float (&nxt)[TKW_ACC], int tile, bool next) {
        moba::wgmma_wait_group<0>();
        moba::wgmma_fence_operand(cur);
        if (next) {
            cp_async_wait<0>();  // chunk tile - 1, copied since the previous chunk's barrier
            moba::fence_proxy_async_shared();
        }
        __syncthreads();  // chunk tile - 1 visible to wgmma; chunk tile's buffer free (every MMA of it complete)
        if (next) {
            topk_wg_issue<T, D>(nxt, sq_wg, buf(tile - 1));  // overlaps the scan below
            if (tile >= 2) topk_wg_load_centroids<T, D>(buf(tile), hi, lo, tile - 2, n_blocks, tid);
        }
        const float t0q = topk_wg_quad_bound(list0), t1q = topk_wg_quad_bound(list1);
        const int j0 = tile * TKW_BN;
        topk_wg_scan_row(list0, cur, 0, j0, lim0 - j0 - 2 * qc, qc, t0q);
        topk_wg_scan_row(list1, cur, 1, j0, lim1 - j0 - 2 * qc, qc, t1q);
        __syncwarp();  // the scans diverge per lane; wgmma.wait_group (next chunk) is .aligned
    };
    // Chunks in pairs, so that each accumulator set has one role per step in the code (see the header).
    int tile = n_tiles - 1;
    for (; tile >= 2; tile -= 2) {
        step(acc_a, acc_b, tile, true);
        step(acc_b, acc_a, tile - 1, true);
    }
    if (tile == 1) {
        step(acc_a, acc_b, 1, true);
        step(acc_b, acc_a, 0, false);
    } else if (tile == 0) {
        step(acc_a, acc_b, 0, false);
    }

#endif

    // The merge: every thread's lists to shared memory (row r, quad thread qc: sL[(4 r + qc) LCAP ..], best first),
    // then thread r < TKW_BM takes the best list_cap of row r's four. The Q tile and centroid chunks are free: the
    // last chunk's barrier came after every thread's wait for its MMA.
    __syncthreads();
    topk_wg_put_list(list0, sL + (4 * r0 + qc) * LCAP);
    topk_wg_put_list(list1, sL + (4 * (r0 + 8) + qc) * LCAP);
    __syncthreads();
    const int t_row = t0 + tid;
    if (tid < TKW_BM && t_row < seqlen) {
        int* o = out + (((long long)b * seqlen + t_row) * heads + h) * top_k;
        const int shift = b * fold_blocks;
        if (CAUSAL) o[0] = (q_pos0 + t_row) / block_size + shift;
        o += CAUSAL ? 1 : 0;
        const unsigned long long* src = sL + 4 * tid * LCAP;
        int p0 = 0, p1 = 0, p2 = 0, p3 = 0;
        auto head = [&](int qq, int p) { return p < list_cap ? src[qq * LCAP + p] : 0ull; };
        unsigned long long k0 = head(0, 0), k1 = head(1, 0), k2 = head(2, 0), k3 = head(3, 0);
        for (int s = 0; s < list_cap; ++s) {
            const unsigned long long m01 = k0 > k1 ? k0 : k1, m23 = k2 > k3 ? k2 : k3;
            const unsigned long long best = m01 > m23 ? m01 : m23;
            o[s] = best == 0ull ? -1 : (int)(unsigned)best + shift;
            if (best == 0ull) continue;  // every list exhausted: the rest stay -1 (keys are distinct otherwise)
            if (best == k0) k0 = head(0, ++p0);
            else if (best == k1) k1 = head(1, ++p1);
            else if (best == k2) k2 = head(2, ++p2);
            else k3 = head(3, ++p3);
        }
    }
#else
    __trap();  // wgmma exists on sm_90a only
#endif
}

// ---- entry points: dtype x head dim (64, 128) x causal x list tier (k8 / k16), the parameter list of
// topk.cu's kernels (the launch plan passes the same arguments), grouped by head dim under MOBA_HAS_HEAD_DIM. ----

#define MOBA_TOPK_WG_KERNEL(NAME, T, D, CAUSAL, LCAP)                                                                 \
    extern "C" __global__ void __launch_bounds__(TKW_THREADS, TKW_MIN_CTAS_##LCAP)                                    \
    NAME(const T* __restrict__ q, const T* __restrict__ chi, const T* __restrict__ clo, int* __restrict__ out,        \
         int seqlen, int heads, int kv_heads, int block_size, int n_blocks, int top_k, int q_pos0,                    \
         int fold_blocks) {                                                                                           \
        topk_wg_body<T, D, CAUSAL, LCAP>(q, chi, clo, out, seqlen, heads, kv_heads, block_size, n_blocks, top_k,     \
                                         q_pos0, fold_blocks);                                                        \
    }

#if MOBA_HAS_HEAD_DIM(64)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_causal_k8,    __nv_bfloat16, 64,  true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_causal_k16,   __nv_bfloat16, 64,  true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_full_k8,      __nv_bfloat16, 64,  false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d64_full_k16,     __nv_bfloat16, 64,  false, 16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_causal_k8,    __half,        64,  true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_causal_k16,   __half,        64,  true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_full_k8,      __half,        64,  false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d64_full_k16,     __half,        64,  false, 16)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_causal_k8,   __nv_bfloat16, 128, true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_causal_k16,  __nv_bfloat16, 128, true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_full_k8,     __nv_bfloat16, 128, false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_bf16_d128_full_k16,    __nv_bfloat16, 128, false, 16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_causal_k8,   __half,        128, true,   8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_causal_k16,  __half,        128, true,  16)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_full_k8,     __half,        128, false,  8)
MOBA_TOPK_WG_KERNEL(moba_topk_wg_fp16_d128_full_k16,    __half,        128, false, 16)
#endif
