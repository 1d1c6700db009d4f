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
#ifndef MOBALAB_TOPK_WGMMA_CUH
#define MOBALAB_TOPK_WGMMA_CUH

#include "topk.cuh"
#include "wgmma.cuh"

// (CTAs of one warpgroup streaming 32-centroid chunks, two per SM, measured on an H200 (d 128, B 128, k 8) 1.01x at
// 256K and 0.98-1.00x of the mma.sync kernel at 8K-64K, and were not kept.)
#define TKW_BM 256       // query rows per CTA (one thread per row)
#define TKW_BN 64        // centroids per streamed chunk (the stacked B tile has 2 TKW_BN rows: hi, lo)
#define TKW_THREADS 256  // two warpgroups
#define TKW_ROWS 64      // rows of one wgmma (m64)

// The body's three kinds. TKW_KIND_EXACT: q.hi + q.lo, every row of a query tile (the router's kernel). TKW_KIND_CERT: one fp16
// MMA per chunk against the centroids rounded to fp16, the rows certified at their end (below, "Certified scores");
// a row the certificate leaves undecided is appended to a row list. TKW_KIND_LIST: the exact kernel over the rows of that
// list, 256 at a time.
#define TKW_KIND_EXACT 0
#define TKW_KIND_CERT 1
#define TKW_KIND_LIST 2

// MOBA_TOPK_WG_HI_ONLY (0 by default; 1 is a timing probe whose selections are not the router's): the exact kinds'
// scores q.hi alone, one m64n64k16 per m64 half and k-step from a B tile of the chunk's TKW_BN hi rows, the lo halves
// neither copied nor multiplied; the scores of the certified kind without its certificate's work.
#ifndef MOBA_TOPK_WG_HI_ONLY
#define MOBA_TOPK_WG_HI_ONLY 0
#endif
// One B tile of TKW_BN rows per chunk (one MMA's worth of columns) or hi and lo stacked (2 TKW_BN rows).
template <int MODE>
constexpr bool tkw_single = MODE == TKW_KIND_CERT || MOBA_TOPK_WG_HI_ONLY;
template <int MODE>
constexpr int tkw_b_rows = tkw_single<MODE> ? TKW_BN : 2 * TKW_BN;  // rows of a chunk's B tile
template <int MODE>
constexpr int tkw_acc = tkw_b_rows<MODE> / 2;  // accumulator floats per thread and m64 half (m64 x B rows)

// The type the MMAs multiply: the input's, or fp16 for the certified kind (11 significant bits against bf16's 8).
template <typename T, int MODE>
struct TkwMmaType {
    using type = T;
};
template <>
struct TkwMmaType<__nv_bfloat16, TKW_KIND_CERT> {
    using type = __half;
};

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

// Centroid chunk `tile` (blocks tile * TKW_BN ..) into the B tile at shared address buf: stacked (two-MMA kinds) row
// r < TKW_BN is hi of block tile * TKW_BN + r, row TKW_BN + r its lo; single (B_ROWS = TKW_BN) hi alone (the
// certified kind passes its fp16 centroids as hi). Blocks past the end are clamped to the last one (the scan never
// offers them).
template <typename T, int D, int B_ROWS>
__device__ __forceinline__ void topk_wg_load_centroids(unsigned buf, const T* __restrict__ hi,
                                                       const T* __restrict__ lo, int tile, int n_blocks,
                                                       int tid) {
    using C = TopkWgCopy<D>;
    const int r0 = tid / C::CH, c = tid % C::CH;
    const unsigned dst = buf + moba::sw128_offset(r0, c * 8, B_ROWS);
    const int j0 = tile * TKW_BN + r0;
#pragma unroll
    for (int k = 0; k < TKW_BN / C::R; ++k) {
        const long long src = (long long)min(j0 + k * C::R, n_blocks - 1) * D + c * 8;
        cp_async16(dst + k * C::R * moba::SW128_ROW_BYTES, hi + src);
        if constexpr (B_ROWS == 2 * TKW_BN) cp_async16(dst + (TKW_BN + k * C::R) * moba::SW128_ROW_BYTES, lo + src);
    }
    cp_async_commit();
}

// The CTA's TKW_BM query rows into the per-m64 swizzled Q tiles at sq: rows t0 + r (past the end clamped to the last
// query), or (ROWS) the positions rows[r] of a row list of n_rows >= 1 entries (r past it clamped to its last).
template <typename T, int D, bool ROWS>
__device__ __forceinline__ void topk_wg_load_q(unsigned sq, const T* __restrict__ q, int b, int h, int t0, int seqlen,
                                               int heads, int tid, const int* __restrict__ rows, int n_rows) {
    using C = TopkWgCopy<D>;
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    const int r0 = tid / C::CH, c = tid % C::CH;
    const unsigned dst = sq + moba::sw128_offset(r0, c * 8, TKW_ROWS);
    const T* src = q + ((long long)b * seqlen * heads + h) * D + c * 8;
    const long long row_stride = (long long)heads * D;
#pragma unroll
    for (int k = 0; k < TKW_BM / C::R; ++k) {
        const int r = k * C::R;  // + r0
        const int t = ROWS ? rows[min(r0 + r, n_rows - 1)] : min(t0 + r0 + r, seqlen - 1);
        cp_async16(dst + (r / TKW_ROWS) * QT_BYTES + (r % TKW_ROWS) * moba::SW128_ROW_BYTES, src + t * row_stride);
    }
}

// Issue (asynchronously, one commit group) the wgmmas of one chunk for this warpgroup's two m64 halves: acc[h]
// = Q rows (64 h ..) x B^T, 64 x B_ROWS, D / 16 k-steps, in type MT.
// MOBA_TOPK_WG_STEP_DESC (1 by default; the same descriptors, wgmma.cuh asserts it; 0, a build option, builds each
// one from its address): each descriptor built once per chunk and stepped by a constant per k-step
// (wgmma_desc_plus), ~2 uniform instructions a wgmma instead of ~8 (masks and shifts), on warpgroup 0's issue, which
// holds it for about half of the chunk's MMA time. H100, 2026-12-05: top-k at 512K 40.30 against 41.32 ms (1.025x),
// 64K at B 32 2.93 against 2.92 ms.
#ifndef MOBA_TOPK_WG_STEP_DESC
#define MOBA_TOPK_WG_STEP_DESC 1
#endif
template <typename MT, int D, int B_ROWS>
__device__ __forceinline__ void topk_wg_issue(float (&acc)[2][B_ROWS / 2], unsigned sq_wg, unsigned buf) {
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    moba::wgmma_fence_operand(acc[0]);
    moba::wgmma_fence_operand(acc[1]);
    moba::wgmma_fence();  // the accumulators were last written by ordinary instructions (the S sums)
    const unsigned long long dq = moba::wgmma_desc_sw128(sq_wg, 0, TKW_ROWS);
    const unsigned long long db = moba::wgmma_desc_sw128(buf, 0, B_ROWS);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const unsigned long long da =
                MOBA_TOPK_WG_STEP_DESC
                    ? moba::wgmma_desc_plus(dq, half * QT_BYTES + moba::sw128_offset(0, 16 * ks, TKW_ROWS))
                    : moba::wgmma_desc_sw128(sq_wg + half * QT_BYTES, ks, TKW_ROWS);
            const unsigned long long dbk = MOBA_TOPK_WG_STEP_DESC
                                               ? moba::wgmma_desc_plus(db, moba::sw128_offset(0, 16 * ks, B_ROWS))
                                               : moba::wgmma_desc_sw128(buf, ks, B_ROWS);
            moba::wgmma_ss<MT>(acc[half], da, dbk, ks > 0);
        }
    moba::wgmma_commit_group();
}
#endif

// ---- Certified scores (TKW_KIND_CERT) ----
// The exact score of block j for row t is s_j = q . (hi_j + lo_j) (fp32 accumulation: the two-MMA kernel's). The
// certified kind scores s~_j = fp32(q16 . c16_j) with c16_j = fp16(c_j) (centroids.cu, moba_c16_norms) and q16 =
// fp16(q) (exact for fp16 inputs), one fp16 MMA, whose error is bounded per row:
//
//   |s_j - s~_j| <= M_t = (1 + 2^-10) (||q|| Delta + ||q - q16|| C) + 2^-13 ||q|| C,
//   Delta = max_j ||hi_j + lo_j - c16_j||,  C = max_j ||c16_j||  (per batch and kv head, from moba_c16_norms),
//
// (Cauchy-Schwarz on q.(hi + lo - c16) + (q - q16).c16; the 2^-13 term covers the fp32 accumulation of both sums,
// at most D 2^-23 ||q|| C at D = 128, and the 1 + 2^-10 the rounding of the norms). A row keeps L = list_cap + 1
// entries (one beyond what it selects) by s~, and offers every score above its threshold minus 2 M, recording the
// largest score that does not end in the list (`ev`: evicted or not taken); every other candidate lies below the
// final threshold minus 2 M, so no candidate outside the list has s~ above u = max(ev, threshold - 2 M), nor s above
// u + M. Entries are linked where neighbours in s~ lie within 2 M of each other; an entry in a chain of links gets its
// exact score (w = s, computed by its warp from q, hi and lo), every other one keeps w = s~. Sorting the list by
// (w, block) descending is then the order of s: entries of different chains are more than 2 M apart in s~, so more
// than 0 apart in s. The row is certified when at least list_cap entries are known to beat every candidate outside
// the list (lower bound, s or s~ - M, above u + M), or when the list holds every candidate; it then writes the first
// list_cap entries of that order, which are the two-MMA kernel's selections up to the fp32 rounding of the sums (its
// rounding order differs from the MMA's; selections differ only at near-ties, as between the exact kernels). An
// undecided row (and every row whose M is not finite: an overflow of fp16, NaN or infinite inputs) is appended to the
// list of rows[b, h, :] (counts[b, h] entries), which the exact kind then routes (TKW_KIND_LIST).

// Row list of the certified kind: TopkRegList with `cap` = list_cap + 1 entries, scans filtered 2 M lower, and the
// largest score offered that does not end in the list.
template <int LCAP>
struct TopkCertList : TopkRegList<LCAP> {
    using Base = TopkRegList<LCAP>;
    float ev;  // the largest offered score not in the list (evicted, or not taken)
    float m2;  // 2 M

    __device__ __forceinline__ void init_cert(int list_cap, float two_m) {
        Base::init(list_cap);
        ev = moba::neg_inf();
        m2 = two_m;
    }
    // The scan offers every score above this (topk_scan_word_lim).
    __device__ __forceinline__ float scan_floor(float thr) const { return thr - m2; }
    __device__ __forceinline__ void offer(float x, int jx) {
        ev = fmaxf(ev, fminf(x, this->v[LCAP - 1]));  // x if it is not taken, else the entry it evicts
        Base::offer(x, jx);
    }
};

// The links of a row's list (entries first .. LCAP - 1, descending in s~): bit i set where entry i lies within 2 M
// of a neighbour (a NaN M links everything), i.e. where the order or the selection needs its exact score.
template <int LCAP>
__device__ __forceinline__ unsigned topk_cert_links(const float (&v)[LCAP], const int (&j)[LCAP], int first, float m2) {
    unsigned need = 0u;
#pragma unroll
    for (int i = 0; i + 1 < LCAP; ++i) {
        const bool link = i >= first && j[i + 1] >= 0 && !(v[i] - v[i + 1] > m2);
        need |= link ? (3u << i) : 0u;
    }
    return need;
}

// The certificate (see "Certified scores") of a list (v descending in s~, blocks j; `cap` entries from first =
// LCAP - cap) with exact scores ex[i] where bit i of `need` is set: sorts the list in place by (w, block), w the exact
// score where computed and s~ elsewhere, which is the order of the exact scores, and returns whether its first
// cap - 1 entries are the row's selections: M finite and cap - 1 entries above um = u + M at their lower bound (s, or
// s~ - M), or every candidate in the list.
template <int LCAP>
__device__ __forceinline__ bool topk_cert_decide(float (&v)[LCAP], int (&j)[LCAP], const float (&ex)[LCAP],
                                                 unsigned need, int cap, float um, float m) {
    const int first = LCAP - cap;
    const bool full = j[LCAP - 1] >= 0;
    int sure = 0;
#pragma unroll
    for (int i = 0; i < LCAP; ++i) {
        const float lb = (need >> i) & 1u ? ex[i] : v[i] - m;
        sure += i >= first && j[i] >= 0 && lb > um ? 1 : 0;
    }
    if (need != 0u) {
        TopkRegList<LCAP> ranked;
        ranked.init(cap);
#pragma unroll
        for (int i = 0; i < LCAP; ++i)
            if (i >= first && j[i] >= 0) ranked.offer_ranked((need >> i) & 1u ? ex[i] : v[i], j[i]);
#pragma unroll
        for (int i = 0; i < LCAP; ++i) {
            v[i] = ranked.v[i];
            j[i] = ranked.j[i];
        }
    }
    return m <= 3.0e38f && (!full || sure >= cap - 1);
}

// A certified row's output: (causal) its own block, then the first cap - 1 entries of its sorted list.
template <int LCAP, bool CAUSAL>
__device__ __forceinline__ void topk_cert_write(const int (&j)[LCAP], int cap, int* __restrict__ out, int b,
                                                int seqlen, int heads, int h, int t_row, int top_k, int q_pos0,
                                                int block_size, int fold_blocks) {
    int* o = out + (((long long)b * seqlen + t_row) * heads + h) * top_k;
    const int shift = b * fold_blocks;
    if (CAUSAL) o[0] = (q_pos0 + t_row) / block_size + shift;
    const int first = LCAP - cap;
#pragma unroll
    for (int i = 0; i + 1 < LCAP; ++i)
        if (i >= first) o[i - first + (CAUSAL ? 1 : 0)] = j[i] < 0 ? -1 : j[i] + shift;
}

// A pending row's record for the certify kernel: row, b * heads + h, need, u + M, M, then v[LCAP] and j[LCAP].
template <int LCAP>
constexpr int tkw_record_words = 5 + 2 * LCAP;

// The certify kernel (one launch after the certified kind's): the rows whose lists have links, four lanes a row.
// Each quad loads its row's q once (D / 4 elements a lane) and, position by position (warp-uniform, so that the
// quad's sums can use full-warp shuffles), the hi / lo of the linked entries; then one lane decides and writes the
// row, or appends it to the row list. Many small CTAs: the L2 latency of the loads hides behind other warps, which a
// CTA of the certified kind (one per SM) could not do at its end.
template <typename T, int D, bool CAUSAL, int LCAP>
__device__ __forceinline__ void topk_wg_certify_body(const T* __restrict__ q, const T* __restrict__ chi,
                                                     const T* __restrict__ clo, int* __restrict__ out,
                                                     int* __restrict__ rows, int* __restrict__ counts,
                                                     const int* __restrict__ pending, int seqlen, int heads,
                                                     int kv_heads, int block_size, int n_blocks, int top_k,
                                                     int q_pos0, int fold_blocks) {
    constexpr int RW = tkw_record_words<LCAP>, PER = D / 4, VEC = PER / 8;
    static_assert(PER % 8 == 0, "whole 16-byte loads per lane");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane & 3, quad = lane >> 2;
    const int n_pending = __shfl_sync(0xffffffffu, counts[0], 0);
    const int cap = (CAUSAL ? top_k - 1 : top_k) + 1;
    const int warps = gridDim.x * (blockDim.x >> 5);
    for (int rb = (blockIdx.x * (blockDim.x >> 5) + warp) * 8; rb < n_pending; rb += warps * 8) {
        const int r = rb + quad;
        const bool valid = r < n_pending;
        const int* rec = pending + (long long)(valid ? r : rb) * RW;
        const int t_row = rec[0], bh = rec[1];
        const unsigned need = valid ? (unsigned)rec[2] : 0u;
        const float um = __uint_as_float((unsigned)rec[3]), m = __uint_as_float((unsigned)rec[4]);
        float v[LCAP], ex[LCAP];
        int jl[LCAP];
#pragma unroll
        for (int i = 0; i < LCAP; ++i) {
            v[i] = __uint_as_float((unsigned)rec[5 + i]);
            jl[i] = rec[5 + LCAP + i];
        }
        const int b = bh / heads, h = bh % heads, g = h / (heads / kv_heads);
        uint4 qv[VEC];
        const T* qr = q + (((long long)b * seqlen + t_row) * heads + h) * D + sub * PER;
#pragma unroll
        for (int k = 0; k < VEC; ++k) qv[k] = *reinterpret_cast<const uint4*>(qr + 8 * k);
        const long long cbase = ((long long)b * kv_heads + g) * n_blocks * D + sub * PER;
#pragma unroll
        for (int i = 0; i < LCAP; ++i) {
            float part = 0.f;
            if ((need >> i) & 1u) {
                const T* hr = chi + cbase + (long long)jl[i] * D;
                const T* lr = clo + cbase + (long long)jl[i] * D;
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    const uint4 hv = *reinterpret_cast<const uint4*>(hr + 8 * k);
                    const uint4 lv = *reinterpret_cast<const uint4*>(lr + 8 * k);
                    const T* qe = reinterpret_cast<const T*>(&qv[k]);
                    const T* he = reinterpret_cast<const T*>(&hv);
                    const T* le = reinterpret_cast<const T*>(&lv);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        const float x = Elem<T>::to_float(qe[e]);
                        part = fmaf(x, Elem<T>::to_float(he[e]), part);
                        part = fmaf(x, Elem<T>::to_float(le[e]), part);
                    }
                }
            }
            part += __shfl_xor_sync(0xffffffffu, part, 1);
            part += __shfl_xor_sync(0xffffffffu, part, 2);
            ex[i] = part;
        }
        if (valid && sub == 0) {
            if (topk_cert_decide<LCAP>(v, jl, ex, need, cap, um, m)) {
                topk_cert_write<LCAP, CAUSAL>(jl, cap, out, b, seqlen, heads, h, t_row, top_k, q_pos0, block_size,
                                              fold_blocks);
            } else {
                rows[(long long)bh * seqlen + atomicAdd(counts + 1 + bh, 1)] = t_row;
            }
        }
    }
}

template <typename T, int D, bool CAUSAL, int LCAP, int MODE>
__device__ __forceinline__ void topk_wg_body(const T* __restrict__ q, const T* __restrict__ chi,
                                             const T* __restrict__ clo, const __half* __restrict__ c16,
                                             const float* __restrict__ norms, int* __restrict__ out,
                                             int* __restrict__ rows, int* __restrict__ counts,
                                             int* __restrict__ pending, int seqlen,
                                             int heads, int kv_heads, int block_size, int n_blocks, int top_k,
                                             int q_pos0, int fold_blocks) {
#if MOBA_HAS_WGMMA
    static_assert(D == 64 || D == 128, "head dims of the wgmma router");
    static_assert(LCAP == 8 || LCAP == 16, "register-list tiers only");
    using MT = typename TkwMmaType<T, MODE>::type;
    constexpr int B_ROWS = tkw_b_rows<MODE>;
    constexpr unsigned QT_BYTES = moba::sw128_tile_bytes(TKW_ROWS, D);
    constexpr unsigned C_BYTES = moba::sw128_tile_bytes(B_ROWS, D);
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
    const int h = cta.h, b = cta.b, g = cta.g, list_cap = cta.list_cap;

    const int row = tid;  // the row this thread scans and owns the list of
    const T* hi = chi + ((long long)b * kv_heads + g) * n_blocks * D;
    const T* lo = clo + ((long long)b * kv_heads + g) * n_blocks * D;
    // the B tiles' source, in the MMA's type: fp16 centroids (certified kind) or hi / lo
    const MT* bsrc, *blo;
    if constexpr (MODE == TKW_KIND_CERT) {
        bsrc = c16 + ((long long)b * kv_heads + g) * n_blocks * D;
        blo = nullptr;  // a single tile
    } else {
        bsrc = hi;
        blo = lo;
    }
    const unsigned sq_wg = sq + wg * 2 * QT_BYTES;  // this warpgroup's two m64 Q tiles
    auto buf = [&](int tile) { return sc + (tile & 1) * C_BYTES; };
    const int bh = b * heads + h;
    // TKW_KIND_LIST: groups of TKW_BM rows of the list, gridDim.x CTAs apart; the other kinds: the CTA's query tile once
    // (Values every thread holds alike go through a shuffle from lane 0, so that ptxas knows them uniform: a branch
    // on a loaded value would put the wgmmas on a divergent path and serialise them, C7518.)
    const int n_listed = MODE == TKW_KIND_LIST ? __shfl_sync(0xffffffffu, counts[1 + bh], 0) : 0;
    const int* listed = rows + (long long)bh * seqlen;
    for (int grp = blockIdx.x; MODE != TKW_KIND_LIST || grp * TKW_BM < n_listed; grp += gridDim.x) {
        int t0 = cta.t0, t_row = cta.t0 + row, n_tiles = cta.n_tiles;
        int n_rows = 0;
        if constexpr (MODE == TKW_KIND_LIST) {
            // the group's rows; the chunks are those of its latest row (the launch's q_pos0 and causality)
            t0 = 0;
            n_rows = min(TKW_BM, n_listed - grp * TKW_BM);
            t_row = row < n_rows ? listed[grp * TKW_BM + row] : seqlen;
            int n_cand = list_cap <= 0 || row >= n_rows ? 0 : (CAUSAL ? (q_pos0 + t_row) / block_size : n_blocks);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) n_cand = max(n_cand, __shfl_xor_sync(0xffffffffu, n_cand, o));
            int* s_cand = reinterpret_cast<int*>(sS);  // the score tile is free until the first chunk
            if (lane == 0) s_cand[warp] = n_cand;
            __syncthreads();
#pragma unroll
            for (int w = 0; w < TKW_THREADS / 32; ++w) n_cand = max(n_cand, s_cand[w]);
            n_tiles = __shfl_sync(0xffffffffu, (n_cand + TKW_BN - 1) / TKW_BN, 0);
            __syncthreads();  // s_cand read by every thread before the first score store
        }

        float m = 0.f;  // TKW_KIND_CERT: the row's error bound M
        TopkCertList<LCAP> clist;  // TKW_KIND_CERT's list; the other kinds' is `list`
        typename TopkListFor<LCAP>::type list;
        if constexpr (MODE == TKW_KIND_CERT) {
            clist.init_cert(list_cap > 0 ? list_cap + 1 : 0, 0.f);
        } else {
            list.init(list_cap);
        }
        float acc[2][tkw_acc<MODE>];  // per m64 half: one MMA's columns, or q.hi in 0 .. TKW_BN - 1, q.lo after

        if (n_tiles > 0) {
            topk_wg_load_q<T, D, MODE == TKW_KIND_LIST>(sq, q, b, h, t0, seqlen, heads, tid, listed + grp * TKW_BM,
                                                   n_rows);
            topk_wg_load_centroids<MT, D, B_ROWS>(buf(n_tiles - 1), bsrc, blo, n_tiles - 1, n_blocks, tid);  // + Q
            if (n_tiles > 1) {
                topk_wg_load_centroids<MT, D, B_ROWS>(buf(n_tiles - 2), bsrc, blo, n_tiles - 2, n_blocks, tid);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            if constexpr (MODE == TKW_KIND_CERT) {
                // Q lands; each thread rounds its own row to fp16 in place and takes its norms for M
                __syncthreads();
                unsigned char* qrow = topk_wg_smem + (sq - smem0) + (row / TKW_ROWS) * QT_BYTES;
                float qq = 0.f, dd = 0.f;
#pragma unroll 1  // once per CTA; unrolled, ptxas hoists every chunk's load and spills
                for (int c = 0; c < D / 8; ++c) {
                    uint4* p = reinterpret_cast<uint4*>(qrow + moba::sw128_offset(row % TKW_ROWS, c * 8, TKW_ROWS));
                    uint4 raw = *p;
                    T* e = reinterpret_cast<T*>(&raw);
                    __half* o = reinterpret_cast<__half*>(&raw);
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        const float x = Elem<T>::to_float(e[k]);
                        const __half x16 = __float2half_rn(x);
                        const float d = x - __half2float(x16);
                        qq = fmaf(x, x, qq);
                        dd = fmaf(d, d, dd);
                        o[k] = x16;
                    }
                    *p = raw;
                }
                const float* nrm = norms + 2 * ((long long)b * kv_heads + g);
                const float qn = sqrtf(qq), dn = sqrtf(dd), delta = nrm[0], cmax = nrm[1];
                m = (1.f + 0x1p-10f) * (qn * delta + dn * cmax) + 0x1p-13f * qn * cmax;
                clist.m2 = 2.f * m;
            }
            moba::fence_proxy_async_shared();  // cp.async data (and the rounded Q) -> visible to wgmma after the barrier
            __syncthreads();
            topk_wg_issue<MT, D, B_ROWS>(acc, sq_wg, buf(n_tiles - 1));
        } else if constexpr (MODE == TKW_KIND_CERT) {
            m = 0.f;  // no candidates: nothing to certify
        }

        const int srow_key = topk_score_swizzle(row & 7);
        const float* srow = sS + row * TKW_BN;
        // The row's candidates are the blocks j < lim (causal: before its own block; else every block). The scan
        // masks them per 32-block word, so the score tile holds raw sums and needs no per-element mask.
        const int lim = CAUSAL ? (q_pos0 + t_row) / block_size : n_blocks;
        // This thread's score-tile elements: rows 128 wg + 16 wwarp + (lane >> 2) + 64 half + 8 e, column pairs
        // 8 nt + 2 (lane & 3), at (s_base ^ 8 nt) + (64 half + 8 e) TKW_BN (topk_score_pair_base).
        const int s_base = topk_score_pair_base<TKW_BN>(wg * 2 * TKW_ROWS + wwarp * 16, 0, lane);

        // One chunk: collect S(tile), hand it to the score tile, start the wgmmas of chunk tile - 1 (`next`), scan.
        // The last chunk (next = false) is peeled off the loop below, so that the accumulators are always written
        // by a wgmma on the loop's back edge: a merge with the ordinary writes of the S sums would make the
        // compiler wait for the in-flight wgmma before the scan (ptxas C7517), which is the overlap this kernel is
        // for. A warpgroup's accumulators hold exactly the score-tile rows its own threads scan (rows 128 wg ..),
        // so the tile's reuse waits for the warpgroup only (a named barrier); the one CTA barrier per chunk makes
        // chunk tile - 1 visible to both warpgroups' wgmmas and, as every thread has passed its wait for chunk
        // `tile`'s wgmmas, frees that chunk's buffer for the copy of chunk tile - 2 issued after it.
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
                        // stacked: q.hi in column c, q.lo in column c + TKW_BN: float i + TKW_BN / 2 (wgmma_acc_col)
                        const int i = nt * 4 + e * 2;
                        float2 sum;
                        if constexpr (tkw_single<MODE>) {
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
            if (next && tile >= 2) topk_wg_load_centroids<MT, D, B_ROWS>(buf(tile), bsrc, blo, tile - 2, n_blocks, tid);
            auto scan = [&]() {
                if (t_row < seqlen) {
#pragma unroll
                    for (int w = TKW_BN / 32 - 1; w >= 0; --w) {
                        if constexpr (MODE == TKW_KIND_CERT) {
                            topk_scan_word_lim(clist, srow, srow_key, w, j0, lim);
                        } else {
                            topk_scan_word_lim(list, srow, srow_key, w, j0, lim);
                        }
                    }
                }
                __syncwarp();  // the scans diverge per lane; wgmma is .aligned
            };
            // Staggered: warpgroup 0 issues chunk tile - 1's wgmmas, then scans; warpgroup 1 scans first, while
            // warpgroup 0 is held by its issue (a warpgroup issuing 16 wgmma waits ~half of their MMA time before
            // its next instruction: scripts/wgmma_overlap.py), and issues after.
            if (wg == 1) scan();
            if (next) topk_wg_issue<MT, D, B_ROWS>(acc, sq_wg, buf(tile - 1));  // overlaps the scans
            if (wg == 0) scan();
        };
        if (n_tiles > 0) {
            for (int tile = n_tiles - 1; tile >= 1; --tile) step(tile, true);
            step(0, false);
        }

        if constexpr (MODE == TKW_KIND_CERT) {
            // Rows whose lists have no links are decided here; the others go to the certify kernel as records
            // (their exact scores are L2 round trips that one CTA per SM could not hide at its end).
            const int first = LCAP - clist.cap;
            const bool active = t_row < seqlen;
            const bool trivial = list_cap <= 0 || lim <= 0;  // no candidates: nothing to decide
            const unsigned need = topk_cert_links<LCAP>(clist.v, clist.j, first, clist.m2);
            const float um = fmaxf(clist.ev, clist.v[LCAP - 1] - clist.m2) + m;
            const bool pend = active && !trivial && m <= 3.0e38f && need != 0u;
            if (active && !pend) {
                float ex[LCAP];
#pragma unroll
                for (int i = 0; i < LCAP; ++i) ex[i] = clist.v[i];
                if (trivial || topk_cert_decide<LCAP>(clist.v, clist.j, ex, 0u, clist.cap, um, m)) {
                    topk_cert_write<LCAP, CAUSAL>(clist.j, clist.cap, out, b, seqlen, heads, h, t_row, top_k, q_pos0,
                                                  block_size, fold_blocks);
                } else {
                    rows[(long long)bh * seqlen + atomicAdd(counts + 1 + bh, 1)] = t_row;
                }
            }
            // the warp's records at consecutive slots: one atomic a warp
            const unsigned pm = __ballot_sync(0xffffffffu, pend);
            if (pm != 0u) {
                const int leader = __ffs(pm) - 1;
                int base = 0;
                if (lane == leader) base = atomicAdd(counts, __popc(pm));
                base = __shfl_sync(0xffffffffu, base, leader);
                if (pend) {
                    int* rec = pending + (long long)(base + __popc(pm & ((1u << lane) - 1u))) * tkw_record_words<LCAP>;
                    rec[0] = t_row;
                    rec[1] = bh;
                    rec[2] = (int)need;
                    rec[3] = (int)__float_as_uint(um);
                    rec[4] = (int)__float_as_uint(m);
#pragma unroll
                    for (int i = 0; i < LCAP; ++i) {
                        rec[5 + i] = (int)__float_as_uint(clist.v[i]);
                        rec[5 + LCAP + i] = clist.j[i];
                    }
                }
            }
        } else if (t_row < seqlen) {
            topk_write_row<LCAP>(list, out, seqlen, heads, h, b, t_row, q_pos0, block_size, top_k, CAUSAL,
                                 fold_blocks);
        }
        if constexpr (MODE != TKW_KIND_LIST) break;
        __syncthreads();  // the next group reuses shared memory
    }
#else
    __trap();  // wgmma exists on sm_90a only
#endif
}

// ---- entry-point definitions (topk_wgmma.cu: the exact kernels, the router's; topk_wgmma_cert.cu: the certified
// kind and the exact kernel over its row list). The exact kernels take the parameter list of topk.cu's kernels (the
// launch plan passes the same arguments); the other two take the fp16 centroids with their norms, and the row list,
// besides. ----

#define MOBA_TOPK_WG_KERNEL(NAME, T, D, CAUSAL, LCAP)                                                                 \
    extern "C" __global__ void __launch_bounds__(TKW_THREADS, 1)                                                      \
    NAME(const T* __restrict__ q, const T* __restrict__ chi, const T* __restrict__ clo, int* __restrict__ out,        \
         int seqlen, int heads, int kv_heads, int block_size, int n_blocks, int top_k, int q_pos0,                    \
         int fold_blocks) {                                                                                           \
        topk_wg_body<T, D, CAUSAL, LCAP, TKW_KIND_EXACT>(q, chi, clo, nullptr, nullptr, out, nullptr, nullptr,        \
                                                         nullptr, seqlen, heads, kv_heads, block_size, n_blocks,      \
                                                         top_k, q_pos0, fold_blocks);                                 \
    }

// The certified kind (MODE TKW_KIND_CERT), the exact kernel over its row list (TKW_KIND_LIST) and the certify kernel
// (MODE -1) share one parameter list: counts[0] is the number of pending records, counts[1 + b heads + h] the length
// of the row list rows[b, h, :].
#define MOBA_TOPK_WG_LIST_KERNEL(NAME, T, D, CAUSAL, LCAP, MODE)                                                      \
    extern "C" __global__ void __launch_bounds__(MODE < 0 ? 128 : TKW_THREADS, MODE < 0 ? 4 : 1)                      \
    NAME(const T* __restrict__ q, const T* __restrict__ chi, const T* __restrict__ clo,                               \
         const __half* __restrict__ c16, const float* __restrict__ norms, int* __restrict__ out,                      \
         int* __restrict__ rows, int* __restrict__ counts, int* __restrict__ pending, int seqlen, int heads,          \
         int kv_heads, int block_size, int n_blocks, int top_k, int q_pos0, int fold_blocks) {                        \
        if constexpr (MODE < 0) {                                                                                     \
            topk_wg_certify_body<T, D, CAUSAL, LCAP>(q, chi, clo, out, rows, counts, pending, seqlen, heads,          \
                                                     kv_heads, block_size, n_blocks, top_k, q_pos0, fold_blocks);     \
        } else {                                                                                                      \
            topk_wg_body<T, D, CAUSAL, LCAP, MODE>(q, chi, clo, c16, norms, out, rows, counts, pending, seqlen,       \
                                                   heads, kv_heads, block_size, n_blocks, top_k, q_pos0,              \
                                                   fold_blocks);                                                      \
        }                                                                                                             \
    }

#endif  // MOBALAB_TOPK_WGMMA_CUH
