// MoBA routing stage 2: fused tiled top-k of the block scores s[t, j] = <q_t, centroid_j>.
//
// One CTA = (query tile of TK_BM rows, query head h, batch b). It streams tiles of BN centroids (kTopkBN: 32;
// 64 with the build option MOBA_TOPK_BN=64) of kv head h / (heads / kv_heads), computes the TK_BM x BN score
// tile on tensor cores (mma.sync m16n8k16, fp32 accumulators) and keeps, per query row, a sorted list of the
// best (score, block) pairs in registers or shared memory. The N x n score matrix never reaches global memory;
// the output is O(N * top_k) indices.
//
// Precision: each fp32 centroid c arrives split as hi = T(c), lo = T(c - hi) (centroids.cu), and the score
// is q.hi + q.lo accumulated in fp32 (two MMAs), i.e. the fp32-centroid score to ~2^-16 relative error. The build
// option MOBA_TOPK_CENTROIDS_INPUT=1 (the router's centroid precision "input") scores q.hi alone: the centroid
// rounded to the input type T, as MoBA and FlashMoBA store it, one MMA per product and no lo tiles copied.
//
// Ordering: (score descending, block index descending): exact ties keep the higher block index, as the
// reference does. Non-candidates: the register-list tiers store the raw sums and cut every 32-block word of a
// row to its candidates (topk_scan_word_lim: blocks j < lim); the heap tier stores NaN there, which fails every
// comparison. NaN scores (NaN inputs) never enter a list.
//
// Causal: the own block c = t / B goes to slot 0; candidates are the complete past blocks j < c, so the
// list holds top_k - 1 entries; centroid tiles that lie entirely at or after the last row's own block are
// never loaded (that halves the work). Non-causal: all n blocks are candidates, the list holds top_k.
// Unused slots stay -1.
//
// Work per CTA: 4 warps in a 4 x 1 layout of 32 rows x 32 centroid columns (2 x 4 m16n8 tiles, 32 fp32
// accumulators; at BN = 64 a 2 x 2 layout of 64 x 32 warp tiles); the score tile then goes to shared
// memory and thread r scans row r. The list's last entry is the threshold: 32 scores at a time are filtered
// into a bit mask against it, and only those candidates are inserted, so the per-warp cost is the largest
// candidate count of its lanes, not their union. Lists of up to 8 or 16 entries (LCAP) live in registers and
// take a candidate with a branch-free compare-and-shift network; longer lists (LCAP = 0) are binary heaps in
// shared memory.
//
// Tie order without index compares (register lists): tiles, 32-column words and bits are all visited in
// descending block order, so a new candidate always has a lower index than every listed block and must
// beat them strictly; the heaps compare (score, index) pairs explicitly.
//
// Shared memory (dynamic): Q tile [BM][D] and centroid tiles hi/lo [BN][D] in T, 16-byte chunks XOR-swizzled
// by row (MOBA_SWZ_COL, ptx.cuh: conflict-free ldmatrix); score tile [BM][BN] fp32, 16-byte chunks swizzled
// so that both the fragment stores and the row scan are conflict-free; for LCAP = 0 the heaps [list_cap][BM]
// (values fp32, blocks int32), laid out so that the 32 lanes of a warp always touch 32 different banks.
#ifndef MOBALAB_TOPK_CUH
#define MOBALAB_TOPK_CUH

#include "ptx.cuh"

using moba::cp_async16;
using moba::cp_async_commit;
using moba::cp_async_wait;
using moba::Elem;
using moba::ldmatrix_x4;
using moba::smem_u32;

#ifndef MOBA_TOPK_CENTROIDS_INPUT
#define MOBA_TOPK_CENTROIDS_INPUT 0
#endif

#define TK_BM 128
#define TK_BN 64  // centroids per tile of the split kernel (two 32-column words, one per thread of a row)
#define TK_THREADS 128

// The dynamic shared-memory declaration; the host emulation of the tests (tests/kernels/host_emulation) puts its
// own in place.
#ifndef MOBA_TOPK_SMEM
#define MOBA_TOPK_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// Swizzle of the 16-byte chunks of a score-tile row: rows 0..3 get even keys (fragment stores of a
// half-warp touch rows 0..3 and two chunks each), rows 4..7 odd keys; all 8 keys distinct (row scan).
__device__ __forceinline__ int topk_score_swizzle(int row) { return ((row & 3) << 1) | ((row >> 2) & 1); }

// A thread's copies of a [rows][D] tile in 16-byte chunks, i = ptid + k NTHREADS: when NTHREADS is a multiple of the
// CH = D / 8 chunks of a row and the rows between a thread's copies, R = NTHREADS / CH, a multiple of 8, every copy
// of a thread has the same chunk column and the same swizzle (row % 8), so a copy is a constant shared-memory step
// and one row index rather than a division and a swizzle (~30 instructions per copy, measured on the wgmma
// kernel). Other shapes (D = 96, 256) keep the generic loop.
template <int D, int NTHREADS, int ROWS>
struct TopkCopyPattern {
    static constexpr int CH = D / 8;
    static constexpr bool kFixed = NTHREADS % CH == 0 && (NTHREADS / CH) % 8 == 0 && ROWS % (NTHREADS / CH) == 0;
    static constexpr int R = kFixed ? NTHREADS / CH : 1;
};

// Issue cp.async loads of centroid tile `tile` (rows tile*BN ..) into sH / sL by NTHREADS threads
// (thread index ptid); rows past the end are clamped to the last block (never offered).
template <typename T, int D, int BN, int NTHREADS>
__device__ __forceinline__ void topk_load_centroids(T* sH, T* sL, const T* __restrict__ hi,
                                                    const T* __restrict__ lo, int tile, int n_blocks,
                                                    int ptid) {
    using P = TopkCopyPattern<D, NTHREADS, BN>;
    constexpr int CH = P::CH;
    if constexpr (P::kFixed) {
        const int r0 = ptid / CH, c = ptid % CH;
        const int off0 = r0 * D + MOBA_SWZ_COL(D, r0, c);
        const int j0 = tile * BN + r0;
#pragma unroll
        for (int k = 0; k < BN / P::R; ++k) {
            const long long src = (long long)min(j0 + k * P::R, n_blocks - 1) * D + c * 8;
            cp_async16(sH + off0 + k * P::R * D, hi + src);
            if constexpr (!MOBA_TOPK_CENTROIDS_INPUT) cp_async16(sL + off0 + k * P::R * D, lo + src);
        }
    } else {
        for (int i = ptid; i < BN * CH; i += NTHREADS) {
            const int r = i / CH, c = i % CH;
            const int j = min(tile * BN + r, n_blocks - 1);
            const int off = r * D + MOBA_SWZ_COL(D, r, c);
            cp_async16(sH + off, hi + (long long)j * D + c * 8);
            if constexpr (!MOBA_TOPK_CENTROIDS_INPUT) cp_async16(sL + off, lo + (long long)j * D + c * 8);
        }
    }
    cp_async_commit();
}

// One warp's (16 MT) x (8 NT) block of the score tile: rows row0.., centroid columns col0.. of the tiles
// sQ [.][D], sH / sL [.][D] (XOR-swizzled 16-byte chunks); acc = q.hi + q.lo in fp32 (q.hi alone with
// MOBA_TOPK_CENTROIDS_INPUT). KU: how many of the
// D/16 k-steps are unrolled.
template <typename T, int D, int MT, int NT, int KU>
__device__ __forceinline__ void topk_score_tile(float (&acc)[MT][NT][4], const T* sQ, const T* sH,
                                                const T* sL, int row0, int col0, int lane) {
    static_assert(NT % 2 == 0, "centroid fragments are loaded in pairs of n8 tiles");
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

#pragma unroll(KU)
    for (int ks = 0; ks < D / 16; ++ks) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int r = row0 + mt * 16 + (lane & 15);
            const int c = ks * 2 + (lane >> 4);
            ldmatrix_x4(smem_u32(sQ + r * D + MOBA_SWZ_COL(D, r, c)), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
        }
        unsigned bh[NT][2], bl[NT][2];
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            const int r = col0 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int c = ks * 2 + ((lane >> 3) & 1);
            const int off = r * D + MOBA_SWZ_COL(D, r, c);
            ldmatrix_x4(smem_u32(sH + off), bh[2 * np][0], bh[2 * np][1], bh[2 * np + 1][0], bh[2 * np + 1][1]);
            if constexpr (!MOBA_TOPK_CENTROIDS_INPUT)
                ldmatrix_x4(smem_u32(sL + off), bl[2 * np][0], bl[2 * np][1], bl[2 * np + 1][0], bl[2 * np + 1][1]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                Elem<T>::mma(acc[mt][nt], a[mt], bh[nt][0], bh[nt][1]);
                if constexpr (!MOBA_TOPK_CENTROIDS_INPUT) Elem<T>::mma(acc[mt][nt], a[mt], bl[nt][0], bl[nt][1]);
            }
    }
}

// Where an m16n8 fragment's float2 goes in the score tile sS [.][BN]: lane's column pair c = col0 + 8 nt +
// 2 (lane & 3) of a row r = row0 + (lane >> 2) + 8 i (row0 a multiple of 8, so every such row has r & 7 = lane >> 2
// and one swizzle key; col0 a multiple of 32, nt < 4) sits at r BN + (((c >> 2) ^ key) << 2) + (c & 3) =
// (base ^ 8 nt) + 8 i BN, with base the value returned here.
template <int BN>
__device__ __forceinline__ int topk_score_pair_base(int row0, int col0, int lane) {
    const int key = topk_score_swizzle(lane >> 2);
    return (row0 + (lane >> 2)) * BN + col0 + ((key >> 1) << 3) + (((((lane & 3) >> 1) ^ key) & 1) << 2) +
           ((lane & 1) << 1);
}

// Accumulators -> score tile sS [TK_BM][BN] (16-byte chunks swizzled by row), NaN where block j0 + col is
// no candidate for the row (causal: j >= own block; both: j >= n_blocks). MASK = false: the caller knows that
// every column is a candidate of every row of the tile.
template <bool CAUSAL, int MT, int NT, int BN, bool MASK = true>
__device__ __forceinline__ void topk_store_scores(const float (&acc)[MT][NT][4], float* sS, int row0,
                                                  int col0, int lane, int t0, int j0, int block_size,
                                                  int n_blocks) {
    // BN 64 only (the MOBA_TOPK_BN=64 build): at BN 32, the default tile, the unmasked loop below already compiles
    // to 16 float2 stores and ~12 address instructions per warp tile (Nsight Compute at 64K), and this form gave
    // the head-dim-256 kernel a 4-byte spill.
    if constexpr (!MASK && BN == 64) {
        // Raw sums at fixed addresses (topk_score_pair_base).
        static_assert(NT <= 4 && BN % 32 == 0, "column pairs of one 32-column word per warp tile");
        const int base = topk_score_pair_base<BN>(row0, col0, lane);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            float* p = sS + (base ^ (nt << 3));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int half = 0; half < 2; ++half)
                    *reinterpret_cast<float2*>(p + (mt * 16 + half * 8) * BN) =
                        make_float2(acc[mt][nt][half * 2], acc[mt][nt][half * 2 + 1]);
        }
        return;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = row0 + mt * 16 + half * 8 + (lane >> 2);
            const int lim = (MASK && CAUSAL) ? (t0 + r) / block_size : n_blocks;
            const int key = topk_score_swizzle(r & 7);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int c = col0 + nt * 8 + (lane & 3) * 2;
                float2 v;
                v.x = (!MASK || j0 + c < lim) ? acc[mt][nt][half * 2] : moba::quiet_nan();
                v.y = (!MASK || j0 + c + 1 < lim) ? acc[mt][nt][half * 2 + 1] : moba::quiet_nan();
                *reinterpret_cast<float2*>(sS + r * BN + (((c >> 2) ^ key) << 2) + (c & 3)) = v;
            }
        }
}

// A row's list of the best (score, block) pairs. Both kinds offer the same three calls:
//   passes(v)    cheap pre-filter of a score against the current threshold (false for NaN),
//   offer(v, j)  take the pair if it ranks above the current last entry,
//   write(o)     the listed blocks in (score, block) descending order, -1 for unfilled slots.

// (v, j) ranks before (w, i): higher score, or equal score and higher block index.
__device__ __forceinline__ bool topk_better(float v, int j, float w, int i) {
    return v > w || (v == w && j > i);
}

// Sorted (descending) list of up to LCAP entries in registers, for list capacities cap <= LCAP. Only the
// last `cap` entries are the list; the first LCAP - cap hold +inf sentinels that nothing displaces, which
// keeps every index a compile-time constant (a run-time index would move the arrays to local memory).
// offer() needs pairs in descending block order (each new block below every listed one): it compares
// scores only, and a tie keeps the listed (higher) block.
template <int LCAP>
struct TopkRegList {
    float v[LCAP];
    int j[LCAP];
    int cap;

    __device__ __forceinline__ void init(int list_cap) {
        cap = list_cap;
#pragma unroll
        for (int i = 0; i < LCAP; ++i) {
            const bool used = i >= LCAP - cap;
            v[i] = used ? moba::neg_inf() : moba::pos_inf();
            j[i] = used ? -1 : 0x7fffffff;  // a sentinel outranks every (score, block) pair, also in offer_ranked
        }
    }
    __device__ __forceinline__ float threshold() const { return v[LCAP - 1]; }
    __device__ __forceinline__ bool passes(float x, float thr) const { return x > thr; }

    // Branch-free compare-and-shift network; a no-op when x does not beat the last entry. offer: the scan's
    // order (a new candidate's block is below every listed one, so the score decides); offer_ranked: any block
    // order, ranked by (score, block) explicitly (the merge of two lists).
    __device__ __forceinline__ void offer(float x, int jx) { insert<false>(x, jx); }
    __device__ __forceinline__ void offer_ranked(float x, int jx) { insert<true>(x, jx); }

    template <bool RANKED>
    __device__ __forceinline__ bool beats(float x, int jx, int i) const {
        if constexpr (RANKED) return topk_better(x, jx, v[i], j[i]);
        else return x > v[i];
    }
    template <bool RANKED>
    __device__ __forceinline__ void insert(float x, int jx) {
        bool below = beats<RANKED>(x, jx, LCAP - 1);  // x ranks above the (old) entry at position i
#pragma unroll
        for (int i = LCAP - 1; i >= 1; --i) {
            const bool above_prev = beats<RANKED>(x, jx, i - 1);
            const float nv = above_prev ? v[i - 1] : (below ? x : v[i]);
            const int nj = above_prev ? j[i - 1] : (below ? jx : j[i]);
            v[i] = nv;
            j[i] = nj;
            below = above_prev;
        }
        v[0] = below ? x : v[0];
        j[0] = below ? jx : j[0];
    }

    __device__ __forceinline__ void write(int* o, int shift) const {
#pragma unroll
        for (int i = 0; i < LCAP; ++i)
            if (i >= LCAP - cap) o[i - (LCAP - cap)] = j[i] < 0 ? j[i] : j[i] + shift;
    }
};

// Long lists: a binary min-heap by rank in shared memory (root = the worst listed pair = the threshold),
// entries of one row strided by TK_BM so that the lanes of a warp hit 32 different banks. Insertion is a
// sift-up while filling and a root replacement + sift-down once full (log2(cap) steps instead of a linear
// shift); write() pops the root repeatedly to emit the descending order. Any visiting order is fine: the
// comparisons include the block index.
struct TopkHeap {
    float* hv;
    int* hj;
    int cap, count;
    float thr_v;
    int thr_j;

    __device__ __forceinline__ void init(float* sLv, int* sLj, int row, int list_cap) {
        hv = sLv + row;
        hj = sLj + row;
        cap = list_cap;
        count = 0;
        thr_v = moba::neg_inf();
        thr_j = -1;
    }
    __device__ __forceinline__ float threshold() const { return thr_v; }
    __device__ __forceinline__ bool passes(float x, float thr) const { return x >= thr; }

    // Place (x, jx) at the root of a heap of `size` entries whose root slot is free, restoring order.
    __device__ __forceinline__ void sift_down(float x, int jx, int size) {
        int pos = 0;
        while (true) {
            const int l = 2 * pos + 1;
            if (l >= size) break;
            int c = l;
            float cv = hv[l * TK_BM];
            int cj = hj[l * TK_BM];
            if (l + 1 < size) {
                const float rv = hv[(l + 1) * TK_BM];
                const int rj = hj[(l + 1) * TK_BM];
                if (topk_better(cv, cj, rv, rj)) {  // the worse child moves up
                    c = l + 1;
                    cv = rv;
                    cj = rj;
                }
            }
            if (!topk_better(x, jx, cv, cj)) break;
            hv[pos * TK_BM] = cv;
            hj[pos * TK_BM] = cj;
            pos = c;
        }
        hv[pos * TK_BM] = x;
        hj[pos * TK_BM] = jx;
    }

    __device__ __forceinline__ void offer(float x, int jx) {
        if (!topk_better(x, jx, thr_v, thr_j)) return;
        if (count < cap) {
            int pos = count++;
            while (pos > 0) {
                const int par = (pos - 1) >> 1;
                const float pv = hv[par * TK_BM];
                const int pj = hj[par * TK_BM];
                if (!topk_better(pv, pj, x, jx)) break;  // parent already ranks below x
                hv[pos * TK_BM] = pv;
                hj[pos * TK_BM] = pj;
                pos = par;
            }
            hv[pos * TK_BM] = x;
            hj[pos * TK_BM] = jx;
            if (count < cap) return;  // not full: everything still passes
        } else {
            sift_down(x, jx, cap);
        }
        thr_v = hv[0];
        thr_j = hj[0];
    }

    __device__ __forceinline__ void write(int* o, int shift) {
        for (int s = cap - 1; s >= count; --s) o[s] = -1;
        for (int size = count; size > 0; --size) {
            o[size - 1] = hj[0] + shift;  // the worst remaining pair takes the last remaining slot
            if (size > 1) sift_down(hv[(size - 1) * TK_BM], hj[(size - 1) * TK_BM], size - 1);
        }
    }
};

// Offer the scores of word w of a score-tile row whose bits are set in m, in descending block order (so a new
// candidate always has a lower block index than every listed one; see "Tie order" above).
template <typename List>
__device__ __forceinline__ void topk_offer_word(List& list, unsigned m, const float* srow, int key, int w, int j0) {
    // Column c = 32 w + bit sits at (((c >> 2) ^ key) << 2) + (c & 3) = 32 w + (bit ^ (key << 2)) (key < 8).
    // The next offer's score is loaded before this one's insertion: the bit order does not depend on the list, and
    // the load's latency would otherwise sit on every offer's dependent chain.
    const float* sw = srow + 32 * w;
    const int key4 = key << 2;
    if (m == 0u) return;
    int bit = 31 - __clz(m);
    m ^= 1u << bit;
    float x = sw[bit ^ key4];
    while (true) {
        const bool more = m != 0u;
        const int next = 31 - __clz(m);
        const float next_x = more ? sw[next ^ key4] : 0.f;
        if (more) m ^= 1u << next;
        list.offer(x, j0 + w * 32 + bit);
        if (!more) break;
        bit = next;
        x = next_x;
    }
}

// Offer the 32 scores of word w of a score-tile row (blocks j0 + 32w .. j0 + 32w + 31) to the list, in
// descending block order. The bit mask is taken against the threshold at the start of the word; offer()
// re-checks against the current one. Cost per warp: the largest candidate count among its lanes.
template <typename List>
__device__ __forceinline__ void topk_scan_word(List& list, const float* srow, int key, int w, int j0) {
    const float thr = list.threshold();
    unsigned m = 0u;
#pragma unroll
    for (int c4 = 0; c4 < 8; ++c4) {
        const float4 v = *reinterpret_cast<const float4*>(srow + (((w * 8 + c4) ^ key) << 2));
        m |= ((unsigned)list.passes(v.x, thr) | ((unsigned)list.passes(v.y, thr) << 1) |
              ((unsigned)list.passes(v.z, thr) << 2) | ((unsigned)list.passes(v.w, thr) << 3))
             << (c4 * 4);
    }
    topk_offer_word(list, m, srow, key, w, j0);
}

// A float below t such that x > topk_below(t) holds for every x >= t, also with denormals flushed to zero
// (-inf for t = -inf: no bound).
__device__ __forceinline__ float topk_below(float t) {
    if (!(t > -3.0e38f)) return moba::neg_inf();
    if (t > 1.0e-37f) return __uint_as_float(__float_as_uint(t) - 1u);  // next float down, still normal
    if (t < -1.0e-37f) return __uint_as_float(__float_as_uint(t) + 1u);  // next float down (larger magnitude)
    return -1.0e-36f;
}

// Bitonic sort of N values into descending order (compile-time indices: the array stays in registers).
template <int N>
__device__ __forceinline__ void topk_sort_desc(float (&g)[N]) {
#pragma unroll
    for (int k = 2; k <= N; k <<= 1)
#pragma unroll
        for (int jj = k >> 1; jj > 0; jj >>= 1)
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const int l = i ^ jj;
                if (l > i) {
                    const float a = g[i], b = g[l];
                    const bool desc = (i & k) == 0;
                    g[i] = desc ? fmaxf(a, b) : fminf(a, b);
                    g[l] = desc ? fminf(a, b) : fmaxf(a, b);
                }
            }
}

// The cap-th largest of 16 values (1 <= cap <= 16), destroying g: sorted, then the minimum of the first cap (a
// select chain by index, g[cap - 1], is turned into a local-memory array by the compiler).
__device__ __forceinline__ float topk_cap_th_largest(float (&g)[16], int cap) {
    topk_sort_desc<16>(g);
    float kth = g[0];
#pragma unroll
    for (int i = 1; i < 16; ++i) kth = i < cap ? fminf(kth, g[i]) : kth;
    return kth;
}

// A lower bound on the cap-th best score of a row, from the n_valid candidates of one 32-score word alone (register
// lists: cap <= 16): the cap-th largest of the 16 maxima of the word's column pairs. Those cap maxima are cap scores
// of the word at or above it, so no score below it can be among the row's best cap, whatever the rest of the row
// holds. A row's first word of candidates, filtered against the still empty list (threshold -inf), would offer all
// of its up to 32 scores; against this bound random scores offer ~10. Invalid columns and NaN count as -inf, so the
// bound is -inf (no pruning) when the word has fewer than cap pairs with a candidate.
__device__ __forceinline__ float topk_word_bound(const float* srow, int key, int w, int n_valid, int cap) {
    float pm[16];
#pragma unroll
    for (int c4 = 0; c4 < 8; ++c4) {
        const float4 v = *reinterpret_cast<const float4*>(srow + (((w * 8 + c4) ^ key) << 2));
        const float x0 = 4 * c4 < n_valid ? v.x : moba::neg_inf(), x1 = 4 * c4 + 1 < n_valid ? v.y : moba::neg_inf();
        const float x2 = 4 * c4 + 2 < n_valid ? v.z : moba::neg_inf(), x3 = 4 * c4 + 3 < n_valid ? v.w : moba::neg_inf();
        const float m0 = fmaxf(x0, x1), m1 = fmaxf(x2, x3);  // NaN only when both are NaN
        pm[2 * c4] = m0 > moba::neg_inf() ? m0 : moba::neg_inf();
        pm[2 * c4 + 1] = m1 > moba::neg_inf() ? m1 : moba::neg_inf();
    }
    return topk_cap_th_largest(pm, cap);
}

// topk_scan_word for a score tile of raw sums (no NaN mask): the row's candidates are the blocks j < lim, so word
// w (blocks j0 + 32 w ..) holds lim - j0 - 32 w of them (clamped to 0..32), and the bit mask is cut to those.
// Register lists only (their passes() is x > thr). The compare is the sign of thr - x: negative exactly when
// x > thr for ordered operands (a difference that flushes to zero keeps its sign), NaN (sign clear on the GPU)
// when either is NaN; a set bit the threshold does not justify costs an offer that offer() turns into a no-op,
// so the mask may over-report but never misses a candidate. That is a subtract and a shift-insert per score
// instead of a compare, a select and an or. While the list is not full (threshold -inf) the word's own bound
// (topk_word_bound) filters instead, through topk_below so that scores at or above it pass.
template <typename List>
__device__ __forceinline__ void topk_scan_word_lim(List& list, const float* srow, int key, int w, int j0, int lim) {
    const int n_valid = lim - j0 - 32 * w;
    if (n_valid <= 0) return;
    float thr = list.threshold();
    if (thr == moba::neg_inf()) thr = topk_below(topk_word_bound(srow, key, w, n_valid, list.cap));
    // Four shift-insert chains of 8 columns each (columns 8 s .. 8 s + 7 in bits 0..7 of q[s]) rather than one of
    // 32: each insert waits for the one before it, so one chain was 32 dependent instructions per word.
    unsigned q[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int c4 = 7; c4 >= 0; --c4) {  // a chain's highest column first: it ends in bit 7
        const float4 v = *reinterpret_cast<const float4*>(srow + (((w * 8 + c4) ^ key) << 2));
        unsigned& s = q[c4 >> 1];
        s = (s << 1) | (__float_as_uint(thr - v.w) >> 31);
        s = (s << 1) | (__float_as_uint(thr - v.z) >> 31);
        s = (s << 1) | (__float_as_uint(thr - v.y) >> 31);
        s = (s << 1) | (__float_as_uint(thr - v.x) >> 31);
    }
    unsigned m = ((q[3] << 24) | (q[2] << 16)) | ((q[1] << 8) | q[0]);
    if (n_valid < 32) m &= (1u << n_valid) - 1u;
    topk_offer_word(list, m, srow, key, w, j0);
}

// Start a CTA's loads: its TK_BM query rows (rows past the end clamped to the last query) and its first centroid
// tile (the last one, tiles are visited in descending block order), one cp.async group each.
template <typename T, int D, int BN, int NTHREADS>
__device__ __forceinline__ void topk_load_first(T* sQ, T* sH, T* sL, const T* __restrict__ q,
                                                const T* __restrict__ hi, const T* __restrict__ lo, int b, int h,
                                                int t0, int seqlen, int heads, int n_tiles, int n_blocks, int tid) {
    using P = TopkCopyPattern<D, NTHREADS, TK_BM>;
    constexpr int CH = P::CH;
    if constexpr (P::kFixed) {
        const int r0 = tid / CH, c = tid % CH;
        T* dst = sQ + r0 * D + MOBA_SWZ_COL(D, r0, c);
        const T* src = q + ((long long)b * seqlen * heads + h) * D + c * 8;
        const long long row_stride = (long long)heads * D;
#pragma unroll
        for (int k = 0; k < TK_BM / P::R; ++k)
            cp_async16(dst + k * P::R * D, src + min(t0 + r0 + k * P::R, seqlen - 1) * row_stride);
    } else {
        for (int i = tid; i < TK_BM * CH; i += NTHREADS) {
            const int r = i / CH, c = i % CH;
            const int t = min(t0 + r, seqlen - 1);
            cp_async16(sQ + r * D + MOBA_SWZ_COL(D, r, c), q + (((long long)b * seqlen + t) * heads + h) * D + c * 8);
        }
    }
    cp_async_commit();
    topk_load_centroids<T, D, BN, NTHREADS>(sH, sL, hi, lo, n_tiles - 1, n_blocks, tid);
}

// A CTA's tile of the top-k grid (x: query tiles of BM rows, the heaviest (latest) causal tiles first so that
// they start while the light ones fill the tail; y: query head; z: batch) and the centroid tiles of BN blocks
// its rows need: the candidates of the tile's last row are the blocks j < n_cand (rows before it have fewer,
// masked per row).
struct TopkTile {
    int h, b, g, t0, list_cap, n_tiles;
};
template <bool CAUSAL, int BM, int BN>
__device__ __forceinline__ TopkTile topk_tile(int seqlen, int heads, int kv_heads, int block_size, int n_blocks,
                                              int top_k, int q_pos0) {
    TopkTile c;
    c.h = blockIdx.y;
    c.b = blockIdx.z;
    c.g = c.h / (heads / kv_heads);
    c.t0 = (gridDim.x - 1 - blockIdx.x) * BM;
    c.list_cap = CAUSAL ? top_k - 1 : top_k;
    const int t_last = min(c.t0 + BM, seqlen) - 1;
    const int n_cand = c.list_cap <= 0 ? 0 : (CAUSAL ? (q_pos0 + t_last) / block_size : n_blocks);
    c.n_tiles = (n_cand + BN - 1) / BN;
    return c;
}

template <int LCAP>
struct TopkListFor {
    using type = TopkRegList<LCAP>;
};
template <>
struct TopkListFor<0> {
    using type = TopkHeap;
};

// Row-list setup: register list (LCAP 8 / 16) or heap in shared memory (LCAP 0).
template <int LCAP>
__device__ __forceinline__ void topk_list_init(typename TopkListFor<LCAP>::type& list, float* sLv, int row,
                                               int list_cap) {
    if constexpr (LCAP == 0) {
        list.init(sLv, reinterpret_cast<int*>(sLv + list_cap * TK_BM), row, list_cap);
    } else {
        list.init(list_cap);
    }
}

// Row t_row's list to out[b, t_row, h, :]. fold_blocks: every block index written moves by b * fold_blocks (-1, an
// unused slot, stays): the numbering of the batch's sequences end to end, which a batch folded into one sequence
// reads (mobalab.kernels._batch_fold), written here instead of by a pass of its own.
template <int LCAP>
__device__ __forceinline__ void topk_write_row(typename TopkListFor<LCAP>::type& list, int* __restrict__ out,
                                               int seqlen, int heads, int h, int b, int t_row, int q_pos0,
                                               int block_size, int top_k, bool causal, int fold_blocks) {
    int* o = out + (((long long)b * seqlen + t_row) * heads + h) * top_k;
    const int shift = b * fold_blocks;
    if (causal) o[0] = (q_pos0 + t_row) / block_size + shift;
    list.write(o + (causal ? 1 : 0), shift);
}

// Centroids per streamed tile: MOBA_TOPK_BN (32 by default; a build option, 64 the tile of earlier versions), always
// 32 at D = 256. 32-centroid tiles take 64 KB of shared memory at D = 128 (128 x 128 Q, 2 x 32 x 128 hi/lo, the
// 128 x 32 fp32 score tile), so three CTAs (12 warps) share an SM where 64-centroid tiles (96 KB) left two: the row
// scans are chains of dependent instructions, and more warps hide them (measured on an H200, B 128, k 8, d 128,
// top-k launch alone: 1.13x at 8K, 1.19x at 16K, 1.16x at 64K, 1.12x at 256K against 64-centroid tiles).
// Four CTAs (48 KB: the score tile in the hi / lo tiles' place, the next tile loaded after the scans instead of
// under them) measured no faster (0.96-1.06x at 8K in two runs, 1.00-1.02x at 16K-256K) and were not kept.
#ifndef MOBA_TOPK_BN
#define MOBA_TOPK_BN 32
#endif
template <int D>
constexpr int kTopkBN = D >= 256 ? 32 : MOBA_TOPK_BN;

// CTAs per SM the mma.sync kernels are compiled for (__launch_bounds__), where more warps hide the row scans'
// dependent chains: four at D = 32 and 64 (28 / 40 KB of shared memory at 32-centroid tiles, <= 128 registers),
// three at D = 96 and 128 (52 / 64 KB; at 128 registers the D = 96 tier-16 kernel would spill); one with the
// heap tier and at D = 256.
#ifndef MOBA_TOPK_MIN_CTAS
#define MOBA_TOPK_MIN_CTAS(D) ((D) <= 64 ? 4 : (D) <= 128 ? 3 : 1)
#endif
template <int D, int LCAP>
constexpr int kTopkMinCtas = LCAP == 0 ? 1 : MOBA_TOPK_MIN_CTAS(D);

// 128 threads; every warp computes a quarter of the score tile, then every thread scans its row.
// LCAP = 8 or 16: register lists for list capacities up to LCAP; LCAP = 0: heap in shared memory.
// (A warp-specialised variant, 4 MMA warps feeding 4 scanning warps through double-buffered score tiles
// and named barriers, measured the same on an H200 (1.61 vs 1.64 ms at 64K): the row scans, not the
// MMAs, set the pace, so the simpler body stays.)
//
// Tile shape by head dim (per warp and k-step of 16, hi and lo: a warp tile of MW rows x 32 centroids costs
// MW/16 A + 4 B ldmatrix.x4 of 512 bytes for (MW/16) x 4 x 2 MMAs of 4096 FLOP):
//   BN = 32 (default):  4 x 1 warps of 32 x 32: 3 KB for 64 KFLOP, 21 FLOP/B (at 128 B/clk of ldmatrix about
//                       what mma.sync sustains per SM); shared memory 384 D + 16 KB (Q 256 D, hi and lo 128 D, 16 KB
//                       of scores) = 28 / 40 / 52 / 64 / 112 KB at D = 32 / 64 / 96 / 128 / 256: four / four / three /
//                       three / two CTAs per SM.
//   BN = 64 (MOBA_TOPK_BN=64, D <= 128): 2 x 2 warps of 64 x 32: 4 KB for 128 KFLOP, 32 FLOP/B; shared memory
//                       512 D + 32 KB = 48 / 64 / 80 / 96 KB: fewer CTAs per SM, fewer barriers per block.
// The MMA work per (row, centroid) is 4 D FLOP against a scan cost that does not depend on D: at D = 256 the
// MMA phase is twice that of D = 128 (where the scans set the pace), so two CTAs per SM, one scanning while
// the other multiplies, matter more there than the lower FLOP/B of the narrower tile.
// The heap tier (LCAP = 0) adds up to 64 x 128 x 8 B = 64 KB (one CTA per SM; at most 176 KB, at D = 256).
template <typename T, int D, bool CAUSAL, int LCAP>
__device__ __forceinline__ void topk_body(const T* __restrict__ q, const T* __restrict__ chi,
                                          const T* __restrict__ clo, int* __restrict__ out, int seqlen,
                                          int heads, int kv_heads, int block_size, int n_blocks, int top_k,
                                          int q_pos0, int fold_blocks) {
    constexpr int BN = kTopkBN<D>;
    constexpr int WARPS_N = BN / 32;          // warps across the centroid columns (32 each)
    constexpr int MT = TK_BM / (4 / WARPS_N) / 16;  // m16 tiles per warp: 4 (64 rows) or 2 (32 rows)
    MOBA_TOPK_SMEM(topk_smem);
    T* sQ = reinterpret_cast<T*>(topk_smem);
    T* sH = sQ + TK_BM * D;
    T* sL = sH + BN * D;
    float* sS = reinterpret_cast<float*>(sL + BN * D);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const TopkTile cta = topk_tile<CAUSAL, TK_BM, BN>(seqlen, heads, kv_heads, block_size, n_blocks, top_k, q_pos0);
    const int h = cta.h, b = cta.b, g = cta.g, t0 = cta.t0, list_cap = cta.list_cap, n_tiles = cta.n_tiles;

    const int row = tid;  // the row this thread scans and owns the list of
    const int t_row = t0 + row;
    const T* hi = chi + ((long long)b * kv_heads + g) * n_blocks * D;
    const T* lo = clo + ((long long)b * kv_heads + g) * n_blocks * D;

    typename TopkListFor<LCAP>::type list;
    topk_list_init<LCAP>(list, sS + TK_BM * BN, row, list_cap);

    if (n_tiles > 0) {
        topk_load_first<T, D, BN, TK_THREADS>(sQ, sH, sL, q, hi, lo, b, h, t0, seqlen, heads, n_tiles, n_blocks, tid);
    }

    // warp tile: rows wm * MT * 16 .., columns wn * 32 ..
    const int wm = WARPS_N == 2 ? warp >> 1 : warp, wn = WARPS_N == 2 ? warp & 1 : 0;
    const int srow_key = topk_score_swizzle(row & 7);
    const float* srow = sS + row * BN;
    const int lim = CAUSAL ? (q_pos0 + t_row) / block_size : n_blocks;  // the row's candidates: blocks j < lim

    for (int tile = n_tiles - 1; tile >= 0; --tile) {
        cp_async_wait<0>();
        __syncthreads();  // Q and centroid tile visible; previous row scans done with sS

        float acc[MT][4][4];
        topk_score_tile<T, D, MT, 4, D / 16>(acc, sQ, sH, sL, wm * (MT * 16), wn * 32, lane);
        const int j0 = tile * BN;
        if constexpr (LCAP == 0) {  // the heap's scan takes masked scores
            topk_store_scores<CAUSAL, MT, 4, BN>(acc, sS, wm * (MT * 16), wn * 32, lane, q_pos0 + t0, j0,
                                                 block_size, n_blocks);
        } else {  // raw sums; the scan masks each word to the row's candidates
            topk_store_scores<CAUSAL, MT, 4, BN, false>(acc, sS, wm * (MT * 16), wn * 32, lane, q_pos0 + t0, j0,
                                                        block_size, n_blocks);
        }
        // The score tile complete, and sH / sL read by every warp: a warp stores its scores only once its MMAs,
        // and so its ldmatrix reads of the centroid tiles, are complete. So this one barrier also frees the
        // centroid tiles for the next load, which runs under the scans. (With a third barrier between the MMAs
        // and an earlier load the kernel took 1.06x as long on an H200 at 64K-256K, B 128, and 1.08x at B 64 /
        // 64K, 0.95-0.97x at 8K, where a CTA streams only two tiles.) The CPU emulation would not catch the load
        // moved above this barrier (its coroutines seldom interleave warps there): the order rests on the
        // dependence above.
        __syncthreads();
        if (tile > 0) topk_load_centroids<T, D, BN, TK_THREADS>(sH, sL, hi, lo, tile - 1, n_blocks, tid);

        if (t_row < seqlen) {
#pragma unroll
            for (int w = BN / 32 - 1; w >= 0; --w) {
                if constexpr (LCAP == 0) topk_scan_word(list, srow, srow_key, w, j0);
                else topk_scan_word_lim(list, srow, srow_key, w, j0, lim);
            }
        }
    }

    if (t_row < seqlen) {
        topk_write_row<LCAP>(list, out, seqlen, heads, h, b, t_row, q_pos0, block_size, top_k, CAUSAL, fold_blocks);
    }
}

// ---- the split router (router variant "split"): 8 warps, each row's centroid columns split over two threads ----
//
// Why: Nsight Compute puts topk_body at 2 CTAs x 4 warps per SM (96 KB of shared memory each at D = 128), the
// tensor pipe at 30% and the warps stalled on fixed-latency dependencies: a row scan is one long dependent chain
// per thread (LDS, compare, the insertion network per candidate), and two warps per scheduler cannot hide it.
// Count per 128 x 64 score tile (ptxas SASS at D = 128, k 8): MMA ~390 instructions per warp, fragment stores
// with the NaN mask ~400, threshold masks ~280 and ~46 per candidate, the per-warp cost being the largest
// candidate count of its lanes; random scores give ~32 candidates in the first word of a row (the empty list
// passes everything) and ~100 per warp over a 512-block row.
// The split body keeps the tile and shared memory (96 KB at D = 128) and doubles the threads: 8 warps (4 x 2 of
// 32 x 32 warp tiles for the MMA, 32 accumulators instead of 64, __launch_bounds__(256, 2) to keep two CTAs,
// 16 warps, per SM), and thread (row, half) scans word `half` of every tile (blocks j0 + 32 half ..) into its
// own register list. Per warp the serial scan work halves and twice as many warps hide its latency.
// Two lists per row would each fill from empty and filter against their own weaker thresholds; two bounds
// keep the candidate counts near those of one list:
//   - the other half's threshold (exchanged through shared memory once per tile): it has `cap` listed pairs at
//     or above it, so a pair strictly below it cannot be among the row's best `cap` (kept: >= it);
//   - in the first tile, the cap-th largest of the 16 maxima of the word's column pairs: `cap` scores of the word
//     lie at or above it (random scores: ~10 candidates instead of 32).
// Both only drop pairs that cannot be selected, so the selections are exactly those of topk_body; at the end
// half 1 hands its list to half 0 through shared memory, which merges it by (score, block) (offer_ranked).
// Tiles whose columns are candidates of every row (all but the last of a causal row range) store the scores
// without the NaN mask. Register lists only (list tiers 8 and 16); the heap tier stays on topk_body. At D = 256
// a CTA takes 161 KB (one per SM, 8 warps as topk_body's two CTAs of 4). Measured no faster than topk_body
// (scripts/bench_router.py times both side by side), so it is opt-in; topk_body is the default.
#define TK_SPLIT_THREADS 256

// CTAs per SM the split kernels are compiled for (__launch_bounds__): two (<= 128 registers) where two fit in
// shared memory, one at D = 256 (161 KB per CTA).
template <int D>
constexpr int kTopkSplitMinCtas = D >= 256 ? 1 : 2;

// Offer word w of a score-tile row to a register list, in descending block order, skipping scores at or below
// `floor` (a bound from elsewhere: topk_below of the other half's threshold) and, with `first`, below the
// cap-th largest maximum of the word's 16 column pairs. Masked (NaN) scores count as -inf.
template <int LCAP>
__device__ __forceinline__ void topk_split_scan_word(TopkRegList<LCAP>& list, const float* srow, int key, int w,
                                                     int j0, float floor, bool first) {
    float x[32];
#pragma unroll
    for (int c4 = 0; c4 < 8; ++c4) {
        const float4 v = *reinterpret_cast<const float4*>(srow + (((w * 8 + c4) ^ key) << 2));
        x[4 * c4] = v.x;
        x[4 * c4 + 1] = v.y;
        x[4 * c4 + 2] = v.z;
        x[4 * c4 + 3] = v.w;
    }
    float thr = fmaxf(list.threshold(), floor);
    if (first) {
        float g[16];
#pragma unroll
        for (int p = 0; p < 16; ++p) g[p] = fmaxf(fmaxf(x[2 * p], x[2 * p + 1]), moba::neg_inf());
        thr = fmaxf(thr, topk_below(topk_cap_th_largest(g, list.cap)));
    }
    unsigned m = 0u;
#pragma unroll
    for (int e = 0; e < 32; ++e) m |= (unsigned)(x[e] > thr) << e;
    topk_offer_word(list, m, srow, key, w, j0);
}

template <typename T, int D, bool CAUSAL, int LCAP>
__device__ __forceinline__ void topk_split_body(const T* __restrict__ q, const T* __restrict__ chi,
                                                const T* __restrict__ clo, int* __restrict__ out, int seqlen,
                                                int heads, int kv_heads, int block_size, int n_blocks, int top_k,
                                                int q_pos0, int fold_blocks) {
    static_assert(LCAP == 8 || LCAP == 16, "the split router keeps register lists only");
    constexpr int BN = TK_BN;  // two 32-column words: one per thread of a row
    constexpr int MT = 2;      // 4 x 2 warps of 32 rows x 32 centroids
    MOBA_TOPK_SMEM(topk_smem);
    T* sQ = reinterpret_cast<T*>(topk_smem);
    T* sH = sQ + TK_BM * D;
    T* sL = sH + BN * D;
    float* sS = reinterpret_cast<float*>(sL + BN * D);
    float* sThr = sS + TK_BM * BN;  // [2][TK_BM]: each half's list threshold after its last scanned tile

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const TopkTile cta = topk_tile<CAUSAL, TK_BM, BN>(seqlen, heads, kv_heads, block_size, n_blocks, top_k, q_pos0);
    const int h = cta.h, b = cta.b, g = cta.g, t0 = cta.t0, list_cap = cta.list_cap, n_tiles = cta.n_tiles;

    const int row = tid & (TK_BM - 1), half = tid / TK_BM;  // the row and word this thread scans
    const int t_row = t0 + row;
    const T* hi = chi + ((long long)b * kv_heads + g) * n_blocks * D;
    const T* lo = clo + ((long long)b * kv_heads + g) * n_blocks * D;

    TopkRegList<LCAP> list;
    list.init(list_cap);
    sThr[half * TK_BM + row] = moba::neg_inf();

    if (n_tiles > 0) {
        topk_load_first<T, D, BN, TK_SPLIT_THREADS>(sQ, sH, sL, q, hi, lo, b, h, t0, seqlen, heads, n_tiles,
                                                    n_blocks, tid);
    }

    const int wm = warp >> 1, wn = warp & 1;  // warp tile: rows wm * 32 .., columns wn * 32 ..
    const int srow_key = topk_score_swizzle(row & 7);
    const float* srow = sS + row * BN;
    const volatile float* other_thr = sThr + (1 - half) * TK_BM + row;
    // blocks below this are candidates of every row of the tile (causal: the first row's own block)
    const int first_lim = CAUSAL ? min((q_pos0 + t0) / block_size, n_blocks) : n_blocks;

    for (int tile = n_tiles - 1; tile >= 0; --tile) {
        cp_async_wait<0>();
        __syncthreads();  // Q and centroid tile visible; previous row scans done with sS

        float acc[MT][4][4];
        // D = 96 unrolled needs more than the 128 registers of two CTAs per SM
        topk_score_tile<T, D, MT, 4, D == 96 ? 1 : D / 16>(acc, sQ, sH, sL, wm * (MT * 16), wn * 32, lane);
        __syncthreads();  // every warp is done reading sH / sL
        if (tile > 0) topk_load_centroids<T, D, BN, TK_SPLIT_THREADS>(sH, sL, hi, lo, tile - 1, n_blocks, tid);
        const int j0 = tile * BN;
        if (j0 + BN <= first_lim) {  // every column a candidate of every row: no mask (all but the last tile)
            topk_store_scores<CAUSAL, MT, 4, BN, false>(acc, sS, wm * (MT * 16), wn * 32, lane, q_pos0 + t0, j0,
                                                        block_size, n_blocks);
        } else {
            topk_store_scores<CAUSAL, MT, 4, BN>(acc, sS, wm * (MT * 16), wn * 32, lane, q_pos0 + t0, j0, block_size,
                                                 n_blocks);
        }
        __syncthreads();

        if (t_row < seqlen) {
            // the other half's threshold of this tile or the one before (both bounds: thresholds only rise)
            topk_split_scan_word(list, srow, srow_key, half, j0, topk_below(*other_thr), tile == n_tiles - 1);
            sThr[half * TK_BM + row] = list.threshold();
        }
    }

    // merge: half 1 hands its list to half 0 through the score tile ([LCAP][TK_BM] scores, then blocks)
    __syncthreads();
    float* sMv = sS;
    int* sMj = reinterpret_cast<int*>(sS + LCAP * TK_BM);
    if (half == 1) {
#pragma unroll
        for (int i = 0; i < LCAP; ++i) {
            sMv[i * TK_BM + row] = list.v[i];
            sMj[i * TK_BM + row] = list.j[i];
        }
    }
    __syncthreads();
    if (half == 0 && t_row < seqlen) {
#pragma unroll
        for (int i = 0; i < LCAP; ++i) {
            const int jx = sMj[i * TK_BM + row];
            // unfilled slots (-1) and sentinels (outside the list's cap) carry no block
            if (jx >= 0 && jx < n_blocks) list.offer_ranked(sMv[i * TK_BM + row], jx);
        }
        topk_write_row<LCAP>(list, out, seqlen, heads, h, b, t_row, q_pos0, block_size, top_k, CAUSAL, fold_blocks);
    }
}

#endif  // MOBALAB_TOPK_CUH
