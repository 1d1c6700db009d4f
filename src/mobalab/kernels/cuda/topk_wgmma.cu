// MoBA routing stage 2 on Hopper warpgroup MMAs (wgmma, sm_90a): the fused top-k of topk.cu (same contract,
// same score tile, row lists and tie order: topk.cuh) with the score tile S = Q C^T computed by asynchronous
// wgmma from 128-byte-swizzled shared memory (wgmma.cuh), so that the tensor cores multiply the next
// centroid chunk while the threads scan the current one.
//
// One CTA = (query tile of TKW_BM = 256 rows, query head h, batch b), two warpgroups (256 threads); warpgroup
// w owns rows 128 w .. 128 w + 127 as two m64 halves. Centroid chunks of TKW_BN = 64 blocks are streamed in
// descending order (double-buffered cp.async): the chunk's hi and lo halves are stacked into one K-major B
// tile of 128 rows (hi rows 0..63, lo rows 64..127), so one wgmma m64n128k16 per (half, k-step) yields q.hi
// in accumulator columns 0..63 and q.lo in 64..127, and S = acc[i] + acc[i + 32] (float i + 32 of a 64x128
// accumulator is column + 64 of float i: wgmma_acc_col). Both sums are fp32 accumulations of the products of
// the inputs with the split fp32 centroid, as in the mma.sync kernel; they differ from it only in the fp32
// rounding order (q.hi and q.lo summed separately rather than interleaved), i.e. at near-ties.
// Per warp the S accumulator has the mma.sync m16n8 layout; the sums q.hi + q.lo go to the score tile unmasked
// (fixed per-thread addresses, one xor per column pair) and thread r scans row r with topk_scan_word_lim, which
// cuts each 32-block word to the row's candidates (j < lim), into a register list (TopkRegList, list tiers 8 and
// 16; the shared-memory heap tier is not offered: its 64 x 256 x 8 bytes of heaps do not fit next to this layout).
//
// Pipeline per chunk (one CTA barrier): wait for S(c) -> warpgroup barrier (its scans of c + 1 done) -> S to
// the score tile, wait for chunk c - 1 -> CTA barrier -> cp.async of chunk c - 2 into chunk c's buffer -> warpgroup
// 0: issue the wgmmas of chunk c - 1 (asynchronous), scan S(c); warpgroup 1: scan S(c), then issue. The scan of
// chunk c thus runs while the tensor cores compute chunk c - 1 and chunk c - 2 arrives; the stagger lets
// warpgroup 1 scan while warpgroup 0 is held by its issue (1.01-1.04x on an H200 against both issuing first: 256K
// 11.80 against 12.26 ms, 64K at B 32 3.00 against 3.08). Timed with clock64 (scripts/wgmma_overlap.py), the scans
// and the MMAs overlap little either way: issuing 16 wgmma holds a warpgroup for ~half of their MMA time, and
// shared-memory loads and stores under SS wgmma run ~3x slower, so the stores and scans add to the MMA time.
//
// Work and bytes per chunk (D = 128, one CTA): MMA 256 rows x 128 stacked columns x 128 x 2 = 8.4 MFLOP (32
// wgmma m64n128k16 of 262 KFLOP), ~2.0 K clocks at the dense 16-bit rate (~4 KFLOP/clk/SM). Shared memory: wgmma
// operand reads 32 x (A 2 KB + B 4 KB) = 192 KB (43 FLOP/B: each wgmma alone needs 96 of the 128 B/clk), score
// tile stores 64 KB and row-scan loads 64 KB, cp.async fills 32 KB: 352 KB, ~2.75 K clocks at 128 B/clk, so shared
// memory rather than the tensor pipe bounds a chunk. Global (L2) reads 64 x 2 x 256 B = 32 KB of centroids per
// 256 rows (256 FLOP/B, twice the mma kernel's 128-row tiles); Q 64 KB once per CTA.
// Registers per thread: accumulators 2 x 64 floats (held by the in-flight wgmma during the scan), the row list
// 2 LCAP + 1, scan temporaries: 212-232 (ptxas, no spills), __launch_bounds__(256, 1). Shared memory (dynamic,
// 1024-byte aligned): Q 256 x D x 2 bytes (64 KB at D = 128), two stacked centroid chunks 2 x 128 x D x 2 (64 KB),
// score tile 256 x 64 x 4 (64 KB), + 1 KB alignment slack = 193 KB at D = 128 (one CTA, 8 warps per SM), 129 KB at
// D = 64.
// Predicted rate (H200, 64K, batch 2, 16 heads, B 128, causal, k 8): 8192 CTAs of on average 4 chunks, 248 chunk
// iterations per SM; the scan of a chunk (~250 instructions per thread plus list insertions) hides under the
// next chunk's MMA, the serial part per iteration (wait, S sums and stores, two barriers) adds ~0.3 K clocks:
// ~3 K clocks x 248 = 0.75 M clocks, ~0.4-0.55 ms with prologue, epilogue and imbalance, against 1.59 ms for the
// mma.sync kernel (the 2x target is 0.8 ms).
// Measured (Nsight Compute source counters, H200, that configuration, before the changes below): 1.54 ms, 619 M
// warp instructions (~9.4 K per warp of 32 rows, ~37 per row and candidate block), the tensor pipe nearly idle
// (HGMMA 0.8% of the instructions), 1.5 instructions per clock per SM at 8 warps: the kernel is bound by its
// integer and compare instructions, not by the MMA or shared memory as predicted. Where they went: the list
// insertions 28% (61 offers per warp, half of them the first word of a row, which the empty list passes
// whole), the per-chunk score store with its per-element causal mask and index arithmetic 17%, the cp.async
// loops' per-copy index arithmetic (~30 instructions per copy) 13%, the threshold masks 13%. Hence: copies with
// one shared-memory step and one row index each (TopkWgCopy), unmasked stores at fixed addresses, the candidate
// cut per word, the compare as a subtract and shift, and the first word filtered against its own bound
// (topk_word_bound). The selections are the same by construction: the same offers in the same order, minus
// offers of scores that cannot end in the list (below the list's threshold, or below cap scores of their word).
// After them (same configuration): 1.35 ms, 413 M warp instructions, 5.8 cycles between a warp's instructions (4.5
// before): the latency that 8 warps per SM cannot hide is now the larger part.
//
// Head dims 64 and 128 (one or two 64-element K blocks of the swizzled layout), list tiers 8 and 16; other
// shapes use topk.cu (the launch plan in _cuda_routing.py decides).
#include "topk.cuh"
#include "wgmma.cuh"

// (CTAs of one warpgroup streaming 32-centroid chunks, two per SM, measured on an H200 (d 128, B 128, k 8) 1.01x at
// 256K and 0.98-1.00x of the mma.sync kernel at 8K-64K, and were not kept.)
#define TKW_BM 256       // query rows per CTA (one thread per row)
#define TKW_BN 64        // centroids per streamed chunk (the stacked B tile has 2 TKW_BN rows: hi, lo)
#define TKW_THREADS 256  // two warpgroups
#define TKW_ROWS 64      // rows of one wgmma (m64)

// MOBA_TOPK_CENTROIDS_INPUT (topk.cuh; 1: the router's centroid precision "input"): the scores q.hi alone, the
// centroid rounded to the input type, one m64n64k16 per m64 half and k-step from a B tile of the chunk's TKW_BN hi
// rows, the lo halves neither copied nor multiplied (H100, top-k launch alone: 512K 33.8-34.0 against 40.2 ms,
// 1.19x; docs/design.md, "Routing").
constexpr int TKW_B_ROWS = MOBA_TOPK_CENTROIDS_INPUT ? TKW_BN : 2 * TKW_BN;  // rows of a chunk's B tile
constexpr int TKW_ACC = TKW_B_ROWS / 2;  // accumulator floats per thread and m64 half (m64 x TKW_B_ROWS)

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
    const unsigned dst = buf + moba::sw128_offset(r0, c * 8, TKW_B_ROWS);
    const int j0 = tile * TKW_BN + r0;
#pragma unroll
    for (int k = 0; k < TKW_BN / C::R; ++k) {
        const long long src = (long long)min(j0 + k * C::R, n_blocks - 1) * D + c * 8;
        cp_async16(dst + k * C::R * moba::SW128_ROW_BYTES, hi + src);
        if constexpr (!MOBA_TOPK_CENTROIDS_INPUT)
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

// Issue (asynchronously, one commit group) the wgmmas of one chunk for this warpgroup's two m64 halves: acc[h]
// = Q rows (64 h ..) x [hi; lo]^T, 64 x 128, D / 16 k-steps.
// MOBA_TOPK_WG_STEP_DESC (1 by default; the same descriptors, wgmma.cuh asserts it; 0, a build option, builds each
// one from its address): each descriptor built once per chunk and stepped by a constant per k-step
// (wgmma_desc_plus), ~2 uniform instructions a wgmma instead of ~8 (masks and shifts), on warpgroup 0's issue, which
// holds it for about half of the chunk's MMA time. H100, 2026-12-05: top-k at 512K 40.30 against 41.32 ms (1.025x),
// 64K at B 32 2.93 against 2.92 ms.
#ifndef MOBA_TOPK_WG_STEP_DESC
#define MOBA_TOPK_WG_STEP_DESC 1
#endif
template <typename T, int D>
__device__ __forceinline__ void topk_wg_issue(float (&acc)[2][TKW_ACC], unsigned sq_wg, unsigned buf) {
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    moba::wgmma_fence_operand(acc[0]);
    moba::wgmma_fence_operand(acc[1]);
    moba::wgmma_fence();  // the accumulators were last written by ordinary instructions (the S sums)
    const unsigned long long dq = moba::wgmma_desc_sw128(sq_wg, 0, TKW_ROWS);
    const unsigned long long db = moba::wgmma_desc_sw128(buf, 0, TKW_B_ROWS);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const unsigned long long da =
                MOBA_TOPK_WG_STEP_DESC
                    ? moba::wgmma_desc_plus(dq, half * QT_BYTES + moba::sw128_offset(0, 16 * ks, TKW_ROWS))
                    : moba::wgmma_desc_sw128(sq_wg + half * QT_BYTES, ks, TKW_ROWS);
            const unsigned long long dbk = MOBA_TOPK_WG_STEP_DESC
                                               ? moba::wgmma_desc_plus(db, moba::sw128_offset(0, 16 * ks, TKW_B_ROWS))
                                               : moba::wgmma_desc_sw128(buf, ks, TKW_B_ROWS);
            moba::wgmma_ss<T>(acc[half], da, dbk, ks > 0);
        }
    moba::wgmma_commit_group();
}
#endif

template <typename T, int D, bool CAUSAL, int LCAP>
__device__ __forceinline__ void topk_wg_body(const T* __restrict__ q, const T* __restrict__ chi,
                                             const T* __restrict__ clo, int* __restrict__ out, int seqlen,
                                             int heads, int kv_heads, int block_size, int n_blocks, int top_k,
                                             int q_pos0, int fold_blocks) {
#if MOBA_HAS_WGMMA
    static_assert(D == 64 || D == 128, "head dims of the wgmma router");
    static_assert(LCAP == 8 || LCAP == 16, "register-list tiers only");
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    constexpr unsigned C_BYTES = moba::sw128_tile_bytes(TKW_B_ROWS, D);
    MOBA_TOPK_WG_SMEM(topk_wg_smem);
    // Swizzle patterns start 1024-byte aligned (wgmma.cuh); the launch adds 1024 bytes of slack.
    const unsigned smem0 = smem_u32(topk_wg_smem);
    const unsigned sq = (smem0 + moba::SW128_PATTERN_BYTES - 1) & ~(moba::SW128_PATTERN_BYTES - 1);
    const unsigned sc = sq + (TKW_BM / TKW_ROWS) * QT_BYTES;
    float* sS = reinterpret_cast<float*>(topk_wg_smem + (sc + 2 * C_BYTES - smem0));

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // The warpgroup index through a shuffle from lane 0: ptxas then knows it is uniform across the warp, and a
    // branch on it (the staggered order below) does not make it serialise every wgmma of the kernel (C7518).
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wwarp = warp & 3;
    const TopkTile cta = topk_tile<CAUSAL, TKW_BM, TKW_BN>(seqlen, heads, kv_heads, block_size, n_blocks, top_k,
                                                           q_pos0);
    const int h = cta.h, b = cta.b, g = cta.g, t0 = cta.t0, list_cap = cta.list_cap, n_tiles = cta.n_tiles;

    const int row = tid;  // the row this thread scans and owns the list of
    const int t_row = t0 + row;
    const T* hi = chi + ((long long)b * kv_heads + g) * n_blocks * D;
    const T* lo = clo + ((long long)b * kv_heads + g) * n_blocks * D;
    const unsigned sq_wg = sq + wg * 2 * QT_BYTES;  // this warpgroup's two m64 Q tiles
    auto buf = [&](int tile) { return sc + (tile & 1) * C_BYTES; };

    typename TopkListFor<LCAP>::type list;
    list.init(list_cap);
    float acc[2][TKW_ACC];  // per m64 half: q.hi in columns 0 .. TKW_BN - 1, q.lo in TKW_BN .. (input centroids: none)

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
        topk_wg_issue<T, D>(acc, sq_wg, buf(n_tiles - 1));
    }

    const int srow_key = topk_score_swizzle(row & 7);
    const float* srow = sS + row * TKW_BN;
    // The row's candidates are the blocks j < lim (causal: before its own block; else every block). The scan masks
    // them per 32-block word, so the score tile holds raw sums and needs no per-element mask.
    const int lim = CAUSAL ? (q_pos0 + t_row) / block_size : n_blocks;
    // This thread's score-tile elements: rows 128 wg + 16 wwarp + (lane >> 2) + 64 half + 8 e, column pairs
    // 8 nt + 2 (lane & 3), at (s_base ^ 8 nt) + (64 half + 8 e) TKW_BN (topk_score_pair_base).
    const int s_base = topk_score_pair_base<TKW_BN>(wg * 2 * TKW_ROWS + wwarp * 16, 0, lane);

    // One chunk: collect S(tile), hand it to the score tile, start the wgmmas of chunk tile - 1 (`next`), scan.
    // The last chunk (next = false) is peeled off the loop below, so that the accumulators are always written
    // by a wgmma on the loop's back edge: a merge with the ordinary writes of the S sums would make the
    // compiler wait for the in-flight wgmma before the scan (ptxas C7517), which is the overlap this kernel is for.
    // A warpgroup's accumulators hold exactly the score-tile rows its own threads scan (rows 128 wg ..), so the
    // tile's reuse waits for the warpgroup only (a named barrier); the one CTA barrier per chunk makes chunk
    // tile - 1 visible to both warpgroups' wgmmas and, as every thread has passed its wait for chunk `tile`'s
    // wgmmas, frees that chunk's buffer for the copy of chunk tile - 2 issued after it.
    auto step = [&](int tile, bool next) {
        moba::wgmma_wait_group<0>();
        moba::wgmma_fence_operand(acc[0]);
        moba::wgmma_fence_operand(acc[1]);
        moba::bar_sync(1 + wg, TKW_THREADS / 2);  // this warpgroup's scans of the previous chunk are done with sS
        const int j0 = tile * TKW_BN;
#pragma unroll
        for (int nt = 0; nt < TKW_BN / 8; ++nt) {
            float* p = sS + (s_base ^ (nt << 3));
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    // q.hi in column c, q.lo in column c + TKW_BN: float i + TKW_BN / 2 (wgmma_acc_col)
                    const int i = nt * 4 + e * 2;
                    float2 sum;
                    if constexpr (MOBA_TOPK_CENTROIDS_INPUT) {
                        sum = make_float2(acc[half][i], acc[half][i + 1]);
                    } else {
                        sum = make_float2(acc[half][i] + acc[half][i + TKW_BN / 2],
                                          acc[half][i + 1] + acc[half][i + 1 + TKW_BN / 2]);
                    }
                    *reinterpret_cast<float2*>(p + (half * TKW_ROWS + 8 * e) * TKW_BN) = sum;
                }
        }
        if (next) {
            cp_async_wait<0>();  // chunk tile - 1, copied since the previous chunk's barrier
            moba::fence_proxy_async_shared();
        }
        __syncthreads();  // score tile complete; chunk tile - 1 visible to wgmma; chunk tile's buffer free
        if (next && tile >= 2) topk_wg_load_centroids<T, D>(buf(tile), hi, lo, tile - 2, n_blocks, tid);
        auto scan = [&]() {
            if (t_row < seqlen) {
#pragma unroll
                for (int w = TKW_BN / 32 - 1; w >= 0; --w) topk_scan_word_lim(list, srow, srow_key, w, j0, lim);
            }
            __syncwarp();  // the scans diverge per lane; wgmma is .aligned
        };
        // Staggered: warpgroup 0 issues chunk tile - 1's wgmmas, then scans; warpgroup 1 scans first, while
        // warpgroup 0 is held by its issue (a warpgroup issuing 16 wgmma waits ~half of their MMA time before its
        // next instruction: scripts/wgmma_overlap.py), and issues after.
        if (wg == 1) scan();
        if (next) topk_wg_issue<T, D>(acc, sq_wg, buf(tile - 1));  // overlaps the scans
        if (wg == 0) scan();
    };
    if (n_tiles > 0) {
        for (int tile = n_tiles - 1; tile >= 1; --tile) step(tile, true);
        step(0, false);
    }

    if (t_row < seqlen) {
        topk_write_row<LCAP>(list, out, seqlen, heads, h, b, t_row, q_pos0, block_size, top_k, CAUSAL, fold_blocks);
    }
#else
    __trap();  // wgmma exists on sm_90a only
#endif
}

// ---- entry points: dtype x head dim (64, 128) x causal x list tier (k8 / k16), the parameter list of
// topk.cu's kernels (the launch plan passes the same arguments), grouped by head dim under MOBA_HAS_HEAD_DIM. ----

#define MOBA_TOPK_WG_KERNEL(NAME, T, D, CAUSAL, LCAP)                                                                 \
    extern "C" __global__ void __launch_bounds__(TKW_THREADS, 1)                                                      \
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
