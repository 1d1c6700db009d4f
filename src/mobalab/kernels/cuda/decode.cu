// MoBA decode over a KV cache in one launch: routing over the cached block key sums, then split-KV attention
// over the union of the selected blocks, both streamed through cp.async pipelines by persistent CTAs that
// take work items from one ticket counter.
//
// Layouts (all contiguous):
//   q        (b, q_len, heads, D) T           queries of the newest q_len tokens of every sequence
//   k, v     (b, kv_heads, capacity, D) T     the cache, head-major: one block of one kv head is one slab
//   sums     (b, kv_heads, n_blocks_cap, D)   fp32 running key sums S_j of every block (MobaKVCache)
//   lengths  (b,) int32                       L_b, tokens held per sequence
//   sel      (b, q_len, heads, top_k) int32   slot 0 own block, then k-1 past blocks, -1 unused
//   out      (b, q_len, heads, D) T, lse (b, q_len, heads) fp32 (natural log)
// Query i of sequence b sits at t = L_b - q_len + i. Rows of one kv head kh: r = i * G + g (G = heads /
// kv_heads, query head kh * G + g), R = G * q_len rows; entry e = r * top_k + s names sel slot s of row r.
//
// Work items, in ticket order (ticket = atomicAdd on one counter; a CTA takes the next ticket when it starts
// an item, so it is known when the item ends):
// 1. routing items (b, kv head, row group of <= 64 rows, split): score the rows of the group against a
//    contiguous range of candidate blocks, so every block sum is read once per kv head for all heads and
//    q_len positions of the group. Candidates are complete blocks (j < own block), |j| = B is a power of
//    two, so ranking by q . S_j equals ranking by q . (S_j / B) exactly: the score is the fp32 dot product
//    with the running sum. The sums stream through DEC_ROUTE_STAGES stages of 16 KB (cp.async.cg, 16-byte
//    copies): 8 lanes share a block (3 shuffles), each stage's scores go to shared memory and every score
//    that beats the last entry of its row's sorted list of the best k-1 (score desc, block desc) is
//    inserted at its rank. The last item of a (b, kv head, row group) merges the split lists by repeated
//    warp arg-max and writes sel (one split: the list is the selection, no merge); then it counts the row
//    group into ready[b, kv head].
// 2. attention units (b, kv head, x < n_x): wait until ready[b, kv head] = n_rg (thread 0 spins on an
//    acquire load), build the union U of the kv head's selections (a bitmap over the blocks 0 .. own, in
//    windows of win_words words; ascending block order), split its U * n_chunks items (block, chunk of
//    <= 64 tokens) evenly over the n_x units, and stream each item's K and V through the stages (zero-filled
//    beyond L_b). Every row that selected the block gets the partial softmax (m, l) and the unnormalised o
//    over the chunk (keys > t masked), written to slot (r, s, chunk). The last unit of a (b, kv head)
//    merges each row's k * n_chunks partials: M = max m, L = sum l 2^(m - M), out = sum o 2^(m - M) / L,
//    lse = (M + log2 L) ln 2. Scores are in base 2 (scale * log2 e folded in).
// Why this cannot deadlock: an attention unit waits only for routing items, and every routing ticket is
// smaller than every attention ticket, so when a CTA holds an attention ticket every routing ticket has been
// taken by a running CTA, which finishes it without waiting. With n_x = 0 the launch routes only (sel).
// Every counter is back to zero when the launch ends (the last CTA to leave resets the ticket).
//
// Bytes one step needs (HBM), per sequence and kv head, n_p = floor((L - 1) / B) past blocks of the last
// query, U = blocks in the union of the group's selections:
//   sums 4 * n_p * D * ceil(R / 64)  +  K, V 2 * 2 * U * B * D (own block: its real tokens)  +  q, out
//   2 * 2 * R * D. Scratch (sel, lists, partials: 32 KB per (b, kv head) at R 4, k 8, B 128) stays in L2.
// FLOPs: routing 2 * b * heads * q_len * n_p * D, attention 4 * b * heads * q_len * |S_t| * D with
//   |S_t| <= k * B; at 512K, b 8, 32 / 8 heads, d 128, B 128, k 8: 268 + 134 MFLOP, ~1.6 FLOP per byte:
//   memory-bound, so CUDA cores (exact fp32 scores) rather than tensor cores.
//
// Decomposition at the benchmark shape (32 / 8 heads, q_len 1: R = 4 rows per kv head, one row group; d 128,
// B 128, k 8, batch 8: 64 (sequence, kv head) pairs; 264 persistent CTAs = 2 per SM, 104.7 KB shared each):
//   512K: 4095 candidate blocks per kv head -> 8 splits of 512 blocks (16 stages of 32 sums, 256 KB): 512
//         routing items in 1.94 waves over the 264 CTAs, 8 lists of 7 merged per row group by its last split;
//         attention: 8 units per kv head (512), each ~7 (block, 64-token chunk) items of the ~29-block union
//         (~230 KB of K/V); 64 partials per kv head merged by its last unit.
//   32K:  255 candidates -> 1 split of 8 stages (128 KB) per kv head: 64 routing items (one wave, no list
//         merge), the other 200 CTAs take attention tickets at once and wait on ready[]; attention as at 512K.
//         (Before: 8 splits of ONE stage each, 512 items in two waves: every item was all prologue and
//         epilogue -- ticket, q load, one 16 KB round trip, list write, fence, counter, merge -- 16 KB in
//         flight per CTA; that is the 38 us of routing measured for 8.4 MB.)
// Bytes in flight per CTA: routing DEC_ROUTE_STAGES - 1 = 5 stages of 16 KB (80 KB; 160 KB per SM); attention 3 stages
// of 32 KB (K + V of 64 tokens; 2 in flight while one is computed). Hand-over: an attention unit spins (acquire load,
// 100 ns sleeps) on ready[b, kv head] = n_rg, raised by the routing item that completes a row group after a fence;
// routing tickets all precede attention tickets, so the wait never deadlocks (above). Per-item fixed chain (estimates,
// not profiled): ticket + q load + first stage landing ~2-3 us, list write + fence + counter ~1 us, split merge (one
// warp per row, n_split * 7 entries, 7 rounds of warp arg-max) ~1 us; attention unit prologue (selection copy from L2,
// union bitmap, two block scans, row lists: ~10 barriers) ~3 us. Per 16 KB routing stage: scoring (4 rows per pass
// since 8edca69: one dependent FMA + shuffle chain per 4 rows instead of per row) and the list merge, two barriers.
// Attention item chain: a CTA recycles a K/V stage only after its item's chain: barrier, copy issue, query reload
// (global load + barrier), S on all warps, barrier, then ONE warp per selecting row (usually one row per block)
// does the whole chunk's softmax and P.V, a 64-token dependent FMA chain, while the other warps wait at the next
// barrier. Estimated chain per item with one selecting row ~2300-2800 cycles (~1.3 us); a chain-only model gives
// ~29 us for the attention phase, far below the ~77 us measured, so most of that phase is not these chains.
//
// What this file is: the routing of 8edca69 / 16d1e54 (DEC_ROUTE_ILP rows per scoring pass, DEC_ROUTE_STAGES
// = 6, no split shorter than 4 stages) with the attention unit of 66cac32 (one warp per selecting row per item,
// query rows reloaded per item), plus two later attention changes that do not depend on how P.V is spread:
// 32-bit item index arithmetic (no 64-bit division per item in the copy issue and the item body) and the last
// unit's merge loading DEC_MERGE_BATCH partials per L2 round trip.
// Measured on an H200 (batch 8, 32 / 8 heads, d 128, B 128, k 8; routing alone = the launch with n_x = 0;
// attention = step - routing):
//   66cac32 (routing: 5 stages, one row per scoring pass, 1-stage splits; attention: as in this file without
//     the two later changes): 512K step 0.183 ms, routing 0.106 (134 MB, 1.27 TB/s), attention ~0.077
//     (121 MB, 1.6 TB/s); 32K step 0.119, routing 0.038 (8.4 MB), attention ~0.081.
//   ce1fd61 (routing: as in this file; attention: softmax and P.V of every item on all 8 warps as column pairs
//     x token slices combined by shuffles with online-softmax rescaling, query rows resident in shared memory
//     for the whole unit, queries loaded by warps 1-7 during the ready[] wait, plus the two changes kept here):
//     512K step 0.210, routing 0.102, attention ~0.108; 32K step 0.153, routing 0.029, attention ~0.124.
//     Routing a little faster; the attention phase 30-40 us SLOWER although its estimated item chain halved.
//     Nsight Compute there: 25% of DRAM peak, 24% achieved occupancy (two 8-warp CTAs per SM, 123 registers),
//     top stalls wait, short_scoreboard, barrier.
// Prediction for this file, not yet measured (routing as at ce1fd61 + attention as at 66cac32): 512K ~0.102 +
// 0.077 = ~0.18 ms, 32K ~0.029 + 0.081 = ~0.11 ms. The two kept attention changes touch only per-item index
// arithmetic and the final merge (a few us at most either way). If the attention phase returns to ~77-81 us,
// the ce1fd61 attention unit (all-warp P.V with resident rows) was the regression. If not, the rest of what
// changed between the two measurements is the routing decomposition, which "step - routing" does not separate
// from attention (at 32K: one 8-stage routing item per kv head while the other 200 CTAs spin on ready[]).
// `scripts/gpu_check.sh decode-ncu` gives the stall reasons of this file to compare with ce1fd61's.
// Next candidates: bulk (TMA) copies of whole chunks to take the per-thread copy issue off the critical
// path, a leaner unit prologue (~11 barriers and two L2 round trips before the first K/V copy), and the next
// unit's first K/V copies issued before the current unit's tail.
// Ideal at 4.0 TB/s: 512K 64 us, 32K 31 us, 1M 97 us, 128K B128 k8 39 us.
//
// Element conversion, the copies and loads, NaN / -inf and the dynamic shared memory come from
// decode_common.cuh (shared with decode_split.cu). Host emulation (tests): DEC_HOST_EMULATION replaces the
// CUDA headers, the PTX helpers (cp.async with deferred completion, ld.cg, acquire, the ticket, the wait) and
// the dynamic shared-memory declaration, so that the same kernel bodies run on host threads.

#include "decode_common.cuh"

#define DEC_THREADS 256
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_FLAGS 64                 // bytes of flags at the start of shared memory (ticket, last, warp sums)
#define DEC_ROUTE_STAGES 6           // cp.async stages of block sums (5 in flight: 80 KB per CTA)
#define DEC_ROUTE_ILP 4              // query rows scored together (independent dependency chains)
#define DEC_ROUTE_STAGE_BYTES 16384  // one stage: 32 block sums at d 128, 64 at d 64
#define DEC_ROUTE_MAX_ROWS 64        // rows of one routing row group
#define DEC_ATTN_CHUNK 64            // most tokens of one attention item
#define DEC_ATTN_ROWS 8              // rows per pass over an item (one warp each in softmax and P.V)
#define DEC_ATTN_STAGE_BYTES 98304   // all K/V stages of a CTA: 3 of 64 tokens at d 128, 6 at d 64
#define DEC_ATTN_MAX_STAGES 8        // more stages for shorter chunks (blocks of 16, 32), up to this
#define DEC_MERGE_BATCH 8           // partials loaded together in the attention merge

// The grid-wide hand-over of the persistent CTAs (tickets and waits); the emulation models these too.
#ifndef DEC_HOST_EMULATION
// The next work item: routing tickets [0, n_route), attention tickets [n_route, n_total) (the emulation
// shuffles the order within each range).
__device__ __forceinline__ unsigned dec_fetch_ticket(unsigned* ticket, int, int) { return atomicAdd(ticket, 1u); }
#define DEC_EMU_ITEM_START()
#endif

// ---- ranking ----

// (v, j, p) ranks before (w, i, o): higher score, then higher block index (the reference's tie rule), then
// lower candidate position (a total order, so every lane of a butterfly agrees on the winner). NaN marks a
// masked or already taken entry and ranks after everything.
__device__ __forceinline__ bool dec_before(float v, int j, int p, float w, int i, int o) {
    if (dec_isnan(v)) return false;
    if (dec_isnan(w)) return true;
    if (v != w) return v > w;
    if (j != i) return j > i;
    return p < o;
}

// Warp-wide best (v, j, p); every lane ends with the same winner (unless all are NaN).
__device__ __forceinline__ void dec_warp_best(float& v, int& j, int& p) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(DEC_FULL, v, off);
        const int oj = __shfl_xor_sync(DEC_FULL, j, off);
        const int op = __shfl_xor_sync(DEC_FULL, p, off);
        if (dec_before(ov, oj, op, v, j, p)) {
            v = ov;
            j = oj;
            p = op;
        }
    }
}

// One warp: the best `lcap` of the n candidates (cv[e], cj[e]) in rank order; lane s < lcap receives entry s
// in (my_v, my_j) ((-inf, -1) when the candidates run out). Taken candidates are overwritten with NaN.
// lcap <= 31.
__device__ __forceinline__ void dec_warp_select(float* cv, const int* cj, int n, int lcap, int lane, float& my_v,
                                                int& my_j) {
    my_v = dec_neg_inf();
    my_j = -1;
    for (int s = 0; s < lcap; ++s) {
        float best_v = dec_nan();
        int best_j = -1, best_p = 0x7fffffff;
        for (int e = lane; e < n; e += 32) {
            if (dec_before(cv[e], cj[e], e, best_v, best_j, best_p)) {
                best_v = cv[e];
                best_j = cj[e];
                best_p = e;
            }
        }
        dec_warp_best(best_v, best_j, best_p);
        const bool found = !dec_isnan(best_v);
        if (lane == s && found) {
            my_v = best_v;
            my_j = best_j;
        }
        if (lane == 0 && found) cv[best_p] = dec_nan();
        __syncwarp();
    }
}

// One warp merges a tile of n (a multiple of 32) scores of one row (srow[e] for block t0 + e, NaN where no
// candidate) into the row's sorted list (lrow / jrow, lcap entries, best first): lane s < lcap holds entry
// s; every score that ranks before the current last entry is inserted at its rank, the entries behind it
// move down one lane. Past the first tiles few scores qualify, so a tile costs little more than one compare
// per score.
__device__ __forceinline__ void dec_merge_tile(const float* srow, int n, int t0, float* lrow, int* jrow, int lcap,
                                               int lane) {
    float lv = lane < lcap ? lrow[lane] : dec_neg_inf();
    int lj = lane < lcap ? jrow[lane] : -1;
    float tv = __shfl_sync(DEC_FULL, lv, lcap - 1);
    int tj = __shfl_sync(DEC_FULL, lj, lcap - 1);
    for (int e0 = 0; e0 < n; e0 += 32) {
        const float v = srow[e0 + lane];
        const int j = t0 + e0 + lane;
        unsigned pending = __ballot_sync(DEC_FULL, dec_before(v, j, 0, tv, tj, 1));
        while (pending) {  // warp-uniform
            const int src = __ffs(pending) - 1;
            pending &= pending - 1;
            const float cv = __shfl_sync(DEC_FULL, v, src);
            const int cj = __shfl_sync(DEC_FULL, j, src);
            if (!dec_before(cv, cj, 0, tv, tj, 1)) continue;  // the list has improved since the ballot
            const int pos = __popc(__ballot_sync(DEC_FULL, lane < lcap && dec_before(lv, lj, 0, cv, cj, 1)));
            const float uv = __shfl_up_sync(DEC_FULL, lv, 1);
            const int uj = __shfl_up_sync(DEC_FULL, lj, 1);
            if (lane == pos) {
                lv = cv;
                lj = cj;
            } else if (lane > pos) {
                lv = uv;
                lj = uj;
            }
            tv = __shfl_sync(DEC_FULL, lv, lcap - 1);
            tj = __shfl_sync(DEC_FULL, lj, lcap - 1);
        }
    }
    if (lane < lcap) {
        lrow[lane] = lv;
        jrow[lane] = lj;
    }
}

// Exclusive prefix sum of v over the CTA (every thread calls it); `total` receives the sum. wsum: DEC_WARPS
// ints of shared memory.
__device__ __forceinline__ int dec_block_scan(int v, int* wsum, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inc = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(DEC_FULL, inc, off);
        if (lane >= off) inc += y;
    }
    if (lane == 31) wsum[warp] = inc;
    __syncthreads();
    int before = 0;
    total = 0;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) {
        const int s = wsum[w];
        if (w < warp) before += s;
        total += s;
    }
    __syncthreads();
    return before + inc - v;
}

// ---- parameters ----

template <typename T>
struct DecParams {
    const T* q;
    const T* k;
    const T* v;
    const float* sums;
    const int* lengths;
    int* sel;
    float* part_v;
    int* part_j;
    float* part_o;
    float* part_ml;
    unsigned* counters;  // [ticket, exited, route counters (b, kv, rg), ready (b, kv), attention counters (b, kv)]
    T* out;
    float* lse;
    int batch, q_len, heads, kv_heads, n_blocks_cap, capacity, block_size, top_k, n_rg, rows_per_group, n_split,
        blocks_per_split, n_x, n_chunks, chunk, win_words, nb_max;
    float scale_log2;

    __device__ __forceinline__ unsigned* route_counters() const { return counters + 2; }
    __device__ __forceinline__ unsigned* ready() const { return counters + 2 + batch * kv_heads * n_rg; }
    __device__ __forceinline__ unsigned* attn_counters() const { return ready() + batch * kv_heads; }
    // Selection entry e = r * top_k + s of kv head kvh of sequence b, written in this launch: from L2.
    __device__ __forceinline__ int sel_entry(int b, int kvh, int e) const {
        const int group = heads / kv_heads, r = e / top_k, s = e - r * top_k, i = r / group, g = r - i * group;
        return dec_ldcg(sel + (((long long)b * q_len + i) * heads + kvh * group + g) * top_k + s);
    }
};

// ---- routing item ----

// Shared memory: [flags] qs [rpg][D] fp32 | own [rpg] | lv [rpg][lcap] fp32 | lj [rpg][lcap] | st [rpg][RT]
// fp32 | (16-byte aligned) stages [DEC_ROUTE_STAGES][RT][D] fp32; the merge reuses the stages as per-warp
// staging of n_split * lcap (value, block) pairs.
template <typename T, int D>
__device__ __forceinline__ void dec_route_item(const DecParams<T>& p, int item, unsigned char* smem) {
    constexpr int NV = D / 32;                           // float4 vectors of one lane's slice of a block sum
    constexpr int V4 = D / 4;                            // float4 vectors of a block sum
    constexpr int RT = DEC_ROUTE_STAGE_BYTES / (4 * D);  // blocks per stage
    constexpr int RS = DEC_ROUTE_STAGES;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int grp = item / p.n_split, split = item - grp * p.n_split;  // grp = (b * kv_heads + kvh) * n_rg + rg
    const int rg = grp % p.n_rg, kvh = (grp / p.n_rg) % p.kv_heads, b = grp / (p.n_rg * p.kv_heads);
    const int group = p.heads / p.kv_heads, rows = group * p.q_len;
    const int rpg = p.rows_per_group, r0 = rg * rpg, nr = min(rpg, rows - r0);
    const int lcap = p.top_k - 1;
    const int len = p.lengths[b];
    const int c_last = (len - 1) / p.block_size;  // own block of the last query: candidates lie below it
    const int j_lo = split * p.blocks_per_split;
    const int j_hi = min(j_lo + p.blocks_per_split, c_last);

    int* flags = reinterpret_cast<int*>(smem);
    float* qs = reinterpret_cast<float*>(smem + DEC_FLAGS);
    int* own = reinterpret_cast<int*>(qs + rpg * D);
    float* lv = reinterpret_cast<float*>(own + rpg);
    int* lj = reinterpret_cast<int*>(lv + rpg * lcap);
    float* st = reinterpret_cast<float*>(lj + rpg * lcap);
    float* stages = reinterpret_cast<float*>(smem + dec_align16(DEC_FLAGS + rpg * (D * 4 + 4 + lcap * 8 + RT * 4)));

    const float* bsum = p.sums + (long long)(b * p.kv_heads + kvh) * p.n_blocks_cap * D;
    const int n_tiles = (lcap > 0 && j_hi > j_lo) ? (j_hi - j_lo + RT - 1) / RT : 0;
    // Tile t: blocks j_lo + t * RT .. (contiguous in memory) into stage t % RS.
    auto issue = [&](int t) {
        const int t0 = j_lo + t * RT, nblk = min(RT, j_hi - t0);
        float* dst = stages + (t % RS) * RT * D;
        const float* src = bsum + (long long)t0 * D;
        for (int x = tid; x < nblk * V4; x += DEC_THREADS) dec_cp_async16(dst + x * 4, src + (long long)x * 4);
    };
#pragma unroll 1
    for (int s = 0; s < RS - 1; ++s) {
        if (s < n_tiles) issue(s);
        dec_cp_async_commit();
    }
    // The first stages are in flight while the query rows load.
    for (int x = tid; x < nr * D; x += DEC_THREADS) {
        const int rr = x / D, e = x - rr * D, r = r0 + rr, i = r / group, g = r - i * group;
        qs[x] = dec_to_float(p.q[((long long)(b * p.q_len + i) * p.heads + kvh * group + g) * D + e]);
    }
    for (int rr = tid; rr < nr; rr += DEC_THREADS) own[rr] = (len - p.q_len + (r0 + rr) / group) / p.block_size;
    for (int x = tid; x < nr * lcap; x += DEC_THREADS) {
        lv[x] = dec_neg_inf();
        lj[x] = -1;
    }
    __syncthreads();

    // Lane (sub, part) of warp w scores block step * 32 + w * 4 + sub of a tile, holding the float4 vectors
    // m * 8 + part of its sum (each 8-lane read is 128 contiguous bytes of shared memory).
    const int sub = lane >> 3, part = lane & 7;
#if MOBA_DECODE_CENTROIDS_INPUT
    const float inv_b = dec_inv_pow2(p.block_size);
#endif
    for (int it = 0; it < n_tiles; ++it) {
        dec_cp_async_wait<RS - 2>();
        __syncthreads();  // tile it has landed for every thread; the last merge is done with st
        if (it + RS - 1 < n_tiles) issue(it + RS - 1);  // into the stage scored in iteration it - 1
        dec_cp_async_commit();
        const float* stage = stages + (it % RS) * RT * D;
        const int t0 = j_lo + it * RT, nblk = min(RT, j_hi - t0);
#pragma unroll
        for (int step = 0; step < RT / 32; ++step) {
            const int col = step * 32 + warp * 4 + sub, j = t0 + col;
            float4 sv[NV];
#pragma unroll
            for (int m = 0; m < NV; ++m) sv[m] = *reinterpret_cast<const float4*>(stage + col * D + (m * 8 + part) * 4);
#if MOBA_DECODE_CENTROIDS_INPUT  // the mean rounded to T (decode_common.cuh)
#pragma unroll
            for (int m = 0; m < NV; ++m) sv[m] = dec_input_centroid<T>(sv[m], inv_b);
#endif
            float poison = 0.f;  // NaN where this lane's part of the sum is not finite
#pragma unroll
            for (int m = 0; m < NV; ++m) poison = dec_poison_nonfinite(sv[m], poison);
            // DEC_ROUTE_ILP rows at a time: independent FMA and shuffle chains, so a tile's scoring costs one
            // chain's latency per DEC_ROUTE_ILP rows instead of one per row.
            auto score_rows = [&](int rr0, auto n_const) {
                constexpr int NR = decltype(n_const)::value;
                float acc[NR];
#pragma unroll
                for (int a = 0; a < NR; ++a) {
                    const float* qrow = qs + (rr0 + a) * D;
                    acc[a] = poison;  // carried to the whole score by the butterfly below
#pragma unroll
                    for (int m = 0; m < NV; ++m) {
                        const float4 qv = *reinterpret_cast<const float4*>(qrow + (m * 8 + part) * 4);
                        acc[a] += qv.x * sv[m].x + qv.y * sv[m].y + qv.z * sv[m].z + qv.w * sv[m].w;
                    }
                }
#pragma unroll
                for (int off = 1; off < 8; off <<= 1) {
#pragma unroll
                    for (int a = 0; a < NR; ++a) acc[a] += __shfl_xor_sync(DEC_FULL, acc[a], off);
                }
                if (part == 0) {
#pragma unroll
                    for (int a = 0; a < NR; ++a)
                        st[(rr0 + a) * RT + col] = (col < nblk && j < own[rr0 + a]) ? acc[a] : dec_nan();
                }
            };
            int rr = 0;
            for (; rr + DEC_ROUTE_ILP <= nr; rr += DEC_ROUTE_ILP) score_rows(rr, dec_int<DEC_ROUTE_ILP>());
            for (; rr < nr; ++rr) score_rows(rr, dec_int<1>());
        }
        __syncthreads();
        for (int rr = warp; rr < nr; rr += DEC_WARPS)
            dec_merge_tile(st + rr * RT, RT, t0, lv + rr * lcap, lj + rr * lcap, lcap, lane);
    }
    dec_cp_async_wait<0>();
    __syncthreads();  // lists complete; the stages are free

    const long long sel_b = (long long)b * p.q_len * p.heads;
    unsigned* counter = p.route_counters() + grp;
    if (p.n_split == 1) {  // the list is the row's selection, in rank order
        for (int x = tid; x < nr * p.top_k; x += DEC_THREADS) {
            const int rr = x / p.top_k, s = x - rr * p.top_k, r = r0 + rr, i = r / group, g = r - i * group;
            p.sel[(sel_b + (long long)i * p.heads + kvh * group + g) * p.top_k + s] = s == 0 ? own[rr]
                                                                                            : lj[rr * lcap + s - 1];
        }
    } else {
        // This split's lists: part[b][kvh][rg][split][row][lcap].
        const long long mine = ((long long)grp * p.n_split + split) * rpg * lcap;
        for (int x = tid; x < nr * lcap; x += DEC_THREADS) {
            p.part_v[mine + x] = lv[x];
            p.part_j[mine + x] = lj[x];
        }
        __threadfence();
        __syncthreads();
        if (tid == 0) flags[1] = atomicAdd(counter, 1u) == (unsigned)(p.n_split - 1);
        __syncthreads();
        if (!flags[1]) return;
        __threadfence();

        // Last item of the row group: merge the n_split lists of every row, write sel, reset the counter.
        const int n = p.n_split * lcap;
        float* mv = stages + warp * 2 * n;
        int* mj = reinterpret_cast<int*>(mv + n);
        for (int rr = warp; rr < nr; rr += DEC_WARPS) {
            for (int e = lane; e < n; e += 32) {
                const long long off =
                    ((long long)grp * p.n_split + e / lcap) * rpg * lcap + (long long)rr * lcap + e % lcap;
                mv[e] = dec_ldcg(p.part_v + off);
                mj[e] = dec_ldcg(p.part_j + off);
            }
            __syncwarp();
            float my_v;
            int my_j;
            dec_warp_select(mv, mj, n, lcap, lane, my_v, my_j);
            const int r = r0 + rr, i = r / group, g = r - i * group;
            int* srow = p.sel + (sel_b + (long long)i * p.heads + kvh * group + g) * p.top_k;
            if (lane == 0) srow[0] = own[rr];
            if (lane < lcap) srow[1 + lane] = my_j;
            __syncwarp();
        }
        if (tid == 0) *counter = 0u;
    }
    if (p.n_x > 0) {  // publish the row group to the attention units of its kv head
        __threadfence();
        __syncthreads();
        if (tid == 0) atomicAdd(p.ready() + b * p.kv_heads + kvh, 1u);
    }
}

// ---- attention unit ----

// Shared memory: [flags] qs [ROWS][D] fp32 | S [ROWS][CHUNK] fp32 | tl [ROWS] | cnt [nb_max] |
// ul [nb_max] | rl [nb_max][R] | (16-byte aligned) stages [AS] x (K [chunk][D], V [chunk][D]) T, AS = the
// stages of `chunk` tokens that fit in DEC_ATTN_STAGE_BYTES (at most DEC_ATTN_MAX_STAGES). Before the first
// K/V copy the stages hold the union bitmap (win_words words) and a copy of the kv head's selection (R * k
// ints); the merge's weights [rmb][k * n_chunks] x 2 reuse them at the end.
template <typename T, int D>
__device__ __forceinline__ void dec_attn_unit(const DecParams<T>& p, int unit, unsigned char* smem) {
    constexpr int CPL = D / 32;  // columns per lane in P.V
    constexpr int CH = DEC_ATTN_CHUNK;
    static_assert(DEC_ATTN_STAGE_BYTES / (2 * CH * D * (int)sizeof(T)) >= 3, "at least three K/V stages");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int x = unit % p.n_x, g = unit / p.n_x, b = g / p.kv_heads, kvh = g - b * p.kv_heads;
    const int group = p.heads / p.kv_heads, rows = group * p.q_len, top_k = p.top_k, E = rows * top_k;
    const int nc = p.n_chunks, chunk = p.chunk, nb_max = p.nb_max;
    const int AS = min(DEC_ATTN_MAX_STAGES, DEC_ATTN_STAGE_BYTES / (2 * chunk * D * (int)sizeof(T)));
    const int len = p.lengths[b];
    const int n_c = (len - 1) / p.block_size + 1;  // blocks 0 .. own block of the last query

    int* flags = reinterpret_cast<int*>(smem);
    int* wsum = flags + 8;
    float* qs = reinterpret_cast<float*>(smem + DEC_FLAGS);
    float* S = qs + DEC_ATTN_ROWS * D;
    int* tl = reinterpret_cast<int*>(S + DEC_ATTN_ROWS * CH);
    int* cnt = tl + DEC_ATTN_ROWS;
    int* ul = cnt + nb_max;
    int* rl = ul + nb_max;
    unsigned char* stage_bytes =
        smem + dec_align16(DEC_FLAGS + DEC_ATTN_ROWS * (D * 4 + CH * 4 + 4) + nb_max * (8 + rows * 4));
    T* stg = reinterpret_cast<T*>(stage_bytes);
    unsigned* bitmap = reinterpret_cast<unsigned*>(stage_bytes);
    int* sel_s = reinterpret_cast<int*>(bitmap + p.win_words);  // sel_s[e]: block of entry e

    if (tid == 0) {
        dec_wait_at_least(p.ready() + g, (unsigned)p.n_rg);
        __threadfence();
    }
    __syncthreads();
    for (int e = tid; e < E; e += DEC_THREADS) sel_s[e] = p.sel_entry(b, kvh, e);
    __syncthreads();

    // The union of the selections: a bitmap per window of wbits blocks, counted, then the blocks of this
    // unit's share extracted in ascending order.
    const int wbits = p.win_words * 32;
    const int n_win = (n_c + wbits - 1) / wbits;
    const int wpt = (p.win_words + DEC_THREADS - 1) / DEC_THREADS;
    const int w0 = min(tid * wpt, p.win_words), w1 = min(w0 + wpt, p.win_words);
    auto build = [&](int w) {
        for (int i = tid; i < p.win_words; i += DEC_THREADS) bitmap[i] = 0u;
        __syncthreads();
        for (int e = tid; e < E; e += DEC_THREADS) {
            const int j = sel_s[e] - w * wbits;  // unused slots (-1) fall below the window
            if (j >= 0 && j < wbits) atomicOr(bitmap + (j >> 5), 1u << (j & 31));
        }
        __syncthreads();
    };
    auto count_mine = [&]() {
        int c = 0;
        for (int i = w0; i < w1; ++i) c += __popc(bitmap[i]);
        return c;
    };
    int U = 0;
    for (int w = 0; w < n_win; ++w) {
        build(w);
        int total;
        dec_block_scan(count_mine(), wsum, total);
        U += total;
    }
    const long long n_all = (long long)U * nc;
    const long long i_lo = x * n_all / p.n_x, i_hi = (x + 1) * n_all / p.n_x;
    const int u_lo = (int)(i_lo / nc);
    const int nbk = i_hi > i_lo ? min((int)((i_hi - 1) / nc) - u_lo + 1, nb_max) : 0;  // nb_max bounds it (plan)
    if (nbk > 0) {
        int base = 0;
        for (int w = 0; w < n_win; ++w) {
            if (n_win > 1) build(w);  // one window: still in place from the count
            int total;
            int u = base + dec_block_scan(count_mine(), wsum, total);
            for (int i = w0; i < w1; ++i) {
                unsigned bits = bitmap[i];
                while (bits) {
                    const int bit = __ffs(bits) - 1;
                    bits &= bits - 1;
                    if (u >= u_lo && u < u_lo + nbk) ul[u - u_lo] = w * wbits + i * 32 + bit;
                    ++u;
                }
            }
            base += total;
            __syncthreads();  // the bitmap is rebuilt for the next window
        }
    }
    // Row lists: the entries that selected each of the unit's blocks (a row selects a block at most once).
    for (int k = tid; k < nbk; k += DEC_THREADS) cnt[k] = 0;
    __syncthreads();
    if (nbk > 0) {
        const int jlo = ul[0], jhi = ul[nbk - 1];
        for (int e = tid; e < E; e += DEC_THREADS) {
            const int j = sel_s[e];
            if (j < jlo || j > jhi) continue;
            int lo = 0, hi = nbk - 1;
            while (lo < hi) {
                const int mid = (lo + hi) >> 1;
                if (ul[mid] < j)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (ul[lo] != j) continue;
            const int pos = atomicAdd(cnt + lo, 1);
            if (pos < rows) rl[lo * rows + pos] = e;
        }
    }
    __syncthreads();

    // The unit's items i_lo .. i_hi - 1 (item i: union block i / nc, chunk i % nc) through AS stages (the
    // selection copy and the bitmap are dead from here).
    const int n_items = (int)(i_hi - i_lo);
    const int i0 = (int)i_lo;  // U * nc <= the cache's chunks: 32-bit item arithmetic (no 64-bit division per item)
    const long long kv_base = (long long)(b * p.kv_heads + kvh) * p.capacity;
    auto issue = [&](int it) {
        const int i = i0 + it;
        const int u = i / nc, c = i - u * nc;
        const int tok0 = ul[u - u_lo] * p.block_size + c * chunk;
        const int nvalid = max(0, min(chunk, len - tok0));
        const long long src = (kv_base + tok0) * D;
        T* ks = stg + (it % AS) * 2 * chunk * D;
        dec_issue_kv_chunk<T, D, DEC_THREADS>(ks, ks + chunk * D, p.k, p.v, src, chunk, nvalid, tid);
    };
#pragma unroll 1
    for (int s = 0; s < AS - 1; ++s) {
        if (s < n_items) issue(s);
        dec_cp_async_commit();
    }
    for (int it = 0; it < n_items; ++it) {
        dec_cp_async_wait_n(AS - 2);
        __syncthreads();  // item it has landed for every thread; item it - 1 is done with its stage
        if (it + AS - 1 < n_items) issue(it + AS - 1);
        dec_cp_async_commit();

        const int i = i0 + it;
        const int u = i / nc, c = i - u * nc, kb = u - u_lo;
        const int n = min(cnt[kb], rows);
        const int* list = rl + kb * rows;
        const int tok0 = ul[kb] * p.block_size + c * chunk;
        const T* ks = stg + (it % AS) * 2 * chunk * D;
        const T* vs = ks + chunk * D;
        for (int rb0 = 0; rb0 < n; rb0 += DEC_ATTN_ROWS) {
            const int nb = min(DEC_ATTN_ROWS, n - rb0);
            if (rb0 > 0) __syncthreads();  // the last pass is done with qs and S
            for (int y = tid; y < nb * D; y += DEC_THREADS) {
                const int rr = y / D, e = y - rr * D, r = list[rb0 + rr] / top_k, qi = r / group, gg = r - qi * group;
                qs[y] = dec_to_float(p.q[((long long)(b * p.q_len + qi) * p.heads + kvh * group + gg) * D + e]);
            }
            for (int rr = tid; rr < nb; rr += DEC_THREADS) tl[rr] = len - p.q_len + (list[rb0 + rr] / top_k) / group;
            __syncthreads();

            dec_chunk_scores<T, D, CH, DEC_THREADS>(S, qs, ks, tl, nb, chunk, tok0, p.scale_log2, tid);
            __syncthreads();

            // Warp rr: base-2 softmax pieces of row rr (m = max, P = 2^(S - m), l = sum P; all -inf: m = -inf,
            // l = 0), then o = P . V over the chunk, lane holding columns lane * CPL ..; written as a partial.
            if (warp < nb) {
                float* srow = S + warp * CH;
                float mx, l;
                dec_row_softmax2(srow, chunk, lane, mx, l);
                __syncwarp();
                float o[CPL];
#pragma unroll
                for (int e = 0; e < CPL; ++e) o[e] = 0.f;
#pragma unroll 4
                for (int tk = 0; tk < chunk; ++tk) {
                    const float pr = srow[tk];
                    float vf[CPL];
                    dec_load_cols<T, CPL>(vs + tk * D + lane * CPL, vf);
#pragma unroll
                    for (int e = 0; e < CPL; ++e) o[e] += pr * vf[e];
                }
                const int ent = list[rb0 + warp], r = ent / top_k, s = ent - r * top_k;
                const long long pi = (((long long)g * rows + r) * top_k + s) * nc + c;
                float* po = p.part_o + pi * D + lane * CPL;
                if constexpr (CPL == 4) {
                    *reinterpret_cast<float4*>(po) = make_float4(o[0], o[1], o[CPL - 2], o[CPL - 1]);
                } else {
#pragma unroll
                    for (int e = 0; e < CPL; ++e) po[e] = o[e];
                }
                if (lane == 0) {
                    p.part_ml[2 * pi] = mx;
                    p.part_ml[2 * pi + 1] = l;
                }
            }
        }
    }
    dec_cp_async_wait<0>();

    __threadfence();
    __syncthreads();
    unsigned* counter = p.attn_counters() + g;
    if (tid == 0) flags[1] = atomicAdd(counter, 1u) == (unsigned)(p.n_x - 1);
    __syncthreads();
    if (!flags[1]) return;
    __threadfence();

    // Last unit of (b, kv head): merge every row's top_k * n_chunks partials, rmb rows at a time. Weights
    // w = 2^(m - M) / L per partial (0 for unused slots), then out = sum w o.
    const int per_row = top_k * nc;
    const int rmb = max(1, min(rows, DEC_ATTN_STAGE_BYTES / (8 * per_row)));
    float* wm = reinterpret_cast<float*>(stage_bytes);
    float* wl = wm + rmb * per_row;
    constexpr int Q4 = D / 4;
    for (int m0 = 0; m0 < rows; m0 += rmb) {
        const int nr = min(rmb, rows - m0);
        for (int y = tid; y < nr * per_row; y += DEC_THREADS) {
            const int rr = y / per_row, sc = y - rr * per_row, r = m0 + rr;
            const bool used = p.sel_entry(b, kvh, r * top_k + sc / nc) >= 0;
            const long long pi = ((long long)g * rows + r) * per_row + sc;
            wm[y] = used ? dec_ldcg(p.part_ml + 2 * pi) : dec_neg_inf();
            wl[y] = used ? dec_ldcg(p.part_ml + 2 * pi + 1) : 0.f;
        }
        __syncthreads();
        for (int rr = warp; rr < nr; rr += DEC_WARPS) {
            float* wrow = wm + rr * per_row;
            const float* lrow = wl + rr * per_row;
            float mx = dec_neg_inf();
            for (int sc = lane; sc < per_row; sc += 32) mx = fmaxf(mx, wrow[sc]);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, off));
            float l = 0.f;
            for (int sc = lane; sc < per_row; sc += 32) {
                const float m = wrow[sc];
                const float w = m == dec_neg_inf() ? 0.f : exp2f(m - mx);
                wrow[sc] = w;
                l += w * lrow[sc];
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(DEC_FULL, l, off);
            const float inv = 1.f / l;
            for (int sc = lane; sc < per_row; sc += 32) wrow[sc] *= inv;
            if (lane == 0) {
                const int r = m0 + rr, qi = r / group, gg = r - qi * group;
                p.lse[(long long)(b * p.q_len + qi) * p.heads + kvh * group + gg] =
                    (mx + log2f(l)) * 0.69314718055994531f;
            }
        }
        __syncthreads();
        for (int y = tid; y < nr * Q4; y += DEC_THREADS) {
            const int rr = y / Q4, d4 = y - rr * Q4, r = m0 + rr, qi = r / group, gg = r - qi * group;
            const long long p0 = ((long long)g * rows + r) * per_row;
            const float* wrow = wm + rr * per_row;
            float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
            // DEC_MERGE_BATCH partials per round trip to L2 (the loads of a batch are independent); a zero
            // weight (unused slot, or no key of the chunk attended) loads nothing: its partial may be unwritten.
            for (int sc0 = 0; sc0 < per_row; sc0 += DEC_MERGE_BATCH) {
                float w[DEC_MERGE_BATCH];
                float4 po[DEC_MERGE_BATCH];
#pragma unroll
                for (int a = 0; a < DEC_MERGE_BATCH; ++a) {
                    w[a] = sc0 + a < per_row ? wrow[sc0 + a] : 0.f;
                    po[a] = w[a] != 0.f ? dec_ldcg(reinterpret_cast<const float4*>(p.part_o + (p0 + sc0 + a) * D) + d4)
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
                }
#pragma unroll
                for (int a = 0; a < DEC_MERGE_BATCH; ++a) {
                    o.x += w[a] * po[a].x;
                    o.y += w[a] * po[a].y;
                    o.z += w[a] * po[a].z;
                    o.w += w[a] * po[a].w;
                }
            }
            const long long oi = ((long long)(b * p.q_len + qi) * p.heads + kvh * group + gg) * D + d4 * 4;
            *reinterpret_cast<uint2*>(p.out + oi) = make_uint2(dec_pack2(o.x, o.y, T()), dec_pack2(o.z, o.w, T()));
        }
        __syncthreads();
    }
    if (tid == 0) {
        *counter = 0u;
        p.ready()[g] = 0u;  // every unit of this kv head has passed its wait
    }
}

// ---- the step: persistent CTAs over the tickets ----

template <typename T, int D>
__device__ __forceinline__ void dec_step_body(const DecParams<T>& p) {
    DEC_DYNAMIC_SMEM(dec_smem);
    int* flags = reinterpret_cast<int*>(dec_smem);
    const int tid = threadIdx.x;
    const int n_route = p.batch * p.kv_heads * p.n_rg * p.n_split;
    const int n_total = n_route + p.batch * p.kv_heads * p.n_x;
    if (tid == 0) flags[0] = (int)dec_fetch_ticket(p.counters, n_route, n_total);
    __syncthreads();
    for (;;) {
        const int t = flags[0];
        __syncthreads();
        if (t >= n_total) break;
        unsigned next = 0u;  // taken now, so that its latency hides behind this item
        if (tid == 0) next = dec_fetch_ticket(p.counters, n_route, n_total);
        DEC_EMU_ITEM_START();
        if (t < n_route)
            dec_route_item<T, D>(p, t, dec_smem);
        else
            dec_attn_unit<T, D>(p, t - n_route, dec_smem);
        __syncthreads();  // every thread is done with this item's shared memory
        if (tid == 0) flags[0] = (int)next;
        __syncthreads();
    }
    if (tid == 0 && atomicAdd(p.counters + 1, 1u) == gridDim.x - 1) {  // the last CTA to leave
        p.counters[0] = 0u;
        p.counters[1] = 0u;
    }
}

// ---- entry points: one macro with a literal parameter list, one line per dtype x head dim (_launch.check_args
// expands the macro to read the signatures) ----

#define MOBA_DECODE_STEP_KERNEL(NAME, T, D)                                                                           \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS, 2) NAME(                                                \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ sums,    \
      const int* __restrict__ lengths, int* __restrict__ sel, float* __restrict__ part_v, int* __restrict__ part_j, \
      float* __restrict__ part_o, float* __restrict__ part_ml, unsigned* __restrict__ counters,                    \
      T* __restrict__ out, float* __restrict__ lse, int batch, int q_len, int heads, int kv_heads,                 \
      int n_blocks_cap, int capacity, int block_size, int top_k, int n_rg, int rows_per_group, int n_split,        \
      int blocks_per_split, int n_x, int n_chunks, int chunk, int win_words, int nb_max, float scale_log2) {       \
    const DecParams<T> p{q, k, v, sums, lengths, sel, part_v, part_j, part_o, part_ml, counters, out, lse, batch,  \
        q_len, heads, kv_heads, n_blocks_cap, capacity, block_size, top_k, n_rg, rows_per_group, n_split,          \
        blocks_per_split, n_x, n_chunks, chunk, win_words, nb_max, scale_log2};                                    \
    dec_step_body<T, D>(p);                                                                                         \
  }

MOBA_DECODE_STEP_KERNEL(moba_decode_step_bf16_d64,  __nv_bfloat16,  64)
MOBA_DECODE_STEP_KERNEL(moba_decode_step_bf16_d128, __nv_bfloat16, 128)
MOBA_DECODE_STEP_KERNEL(moba_decode_step_fp16_d64,  __half,         64)
MOBA_DECODE_STEP_KERNEL(moba_decode_step_fp16_d128, __half,        128)
