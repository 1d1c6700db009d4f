// MoBA decode over a KV cache in two plain launches: a routing kernel, then an attention kernel. Many small
// CTAs, no persistent work queue, no waits between CTAs: the bandwidth-first alternative to decode.cu (same
// semantics, layouts and outputs; see docs/design.md, "MoBA semantics").
//
// Layouts (all contiguous, as decode.cu):
//   q        (b, q_len, heads, D) T           queries of the newest q_len tokens of every sequence
//   k, v     (b, kv_heads, capacity, D) T     the cache, head-major: one block of one kv head is one slab
//   sums     (b, kv_heads, n_blocks_cap, D)   fp32 running key sums S_j of every block
//   lengths  (b,) int32                       L_b, tokens held per sequence
//   sel      (b, q_len, heads, top_k) int32   slot 0 own block, then k-1 past blocks, -1 unused
//   out      (b, q_len, heads, D) T, lse (b, q_len, heads) fp32 (natural log)
// Query i of sequence b sits at t = L_b - q_len + i. Rows of one kv head kh: r = i * G + g (G = heads /
// kv_heads, query head kh * G + g), R = G * q_len rows; entry e = r * top_k + s names sel slot s of row r.
//
// 1. moba_decode_route_*: one CTA per (sequence, kv head, row group of <= 64 rows, range of candidate
//    blocks). A range is tiles_per_range tiles of RB = 32 KB / (4 D) block sums (64 at d 128, 128 at d 64).
//    Each thread loads its 8 float4 of a tile straight into registers (ld.global.nc, all 8 issued before the
//    first is used: 32 KB in flight per CTA), 8 lanes per block sum, and scores every row of the group:
//    s_j = q . S_j in fp32 (candidates are complete blocks of B = power-of-two tokens, so this ranks exactly
//    like q . S_j / B), NaN where block j is not a candidate of the row (j >= the row's own block). The
//    row's best k-1 so far (score desc, block desc) are kept in shared memory; a tile is merged by rank:
//    every tile score that beats the list's last entry, and every list entry, counts the entries ranked
//    before it and lands at that rank if it is below k-1. One range: the list is the selection. More: the
//    CTA writes its lists to scratch, and the last CTA of the (sequence, kv head, row group) (atomic counter
//    after a fence; it resets the counter) merges the n_range lists of every row by k-1 rounds of warp
//    arg-max and writes sel.
// 2. moba_decode_attend_*: one CTA per (sequence, kv head, entry e, chunk c of <= 64 tokens of the block).
//    The CTA reads its block j = sel[e] and the kv head's R * k selection entries; if an earlier entry of
//    the kv head selected j, another CTA owns (j, c) and this one only counts itself; otherwise it copies
//    chunk c of K and V of block j (cp.async.cg 16-byte copies, all issued at once: 32 KB at d 128, zeros
//    beyond L_b) and computes, for every row that selected j, the base-2 partial softmax (m, l) and the
//    unnormalised o over the chunk (keys after the row's position masked; scale * log2 e folded in), written
//    to slot (r, s, c). So a block that several rows of a kv head select is read once. The last CTA of the
//    (sequence, kv head) merges each row's k * n_chunks partials: M = max m, L = sum l 2^(m - M),
//    out = sum o 2^(m - M) / L in q's dtype, lse = (M + log2 L) ln 2. Unused slots (sel -1) and chunks that
//    no key of the row reaches (m = -inf) weigh 0.
// Counters: [route (b, kv, row group) | attention (b, kv)], each back to zero when its launch ends.
//
// Bytes (HBM) per sequence and kv head, n_p = floor((L - 1) / B) candidate blocks, U = blocks in the union of
// the kv head's selections: sums 4 * n_p * D * ceil(R / 64) + K, V 2 * 2 * U * B * D (the own block's chunks
// beyond L are not read) + q, out. Scratch (lists, partials) stays in L2.
// FLOPs: routing 2 * b * heads * q_len * n_p * D, attention 4 * b * heads * q_len * |S_t| * D; at 512K, b 8,
// 32 / 8 heads, d 128, B 128, k 8: 268 + 134 MFLOP for 255 MB (~1.6 FLOP per byte): memory-bound, CUDA
// cores with exact fp32 scores.
//
// Prediction (H200, ~4.2 TB/s measured copy bandwidth, DRAM latency ~600-800 ns; batch 8, 32 / 8 heads,
// d 128, B 128, k 8, q_len 1, not yet measured):
//   Little's law: 4.2 TB/s * 0.7 us = ~2.9 MB in flight over 132 SMs, ~22 KB per SM. Routing CTAs (256
//   threads, <= 128 registers: 2 per SM by registers) keep 32 KB each in flight while loading: 64 KB per SM
//   at most, so even with two of three scoring or merging the SM holds about what the law asks. Attention
//   CTAs (<= 64 registers and 52 KB of shared memory: 4 per SM) keep 32 KB each in flight the same way.
//   Put as a CTA's life instead: a CTA that moves 32 KB must finish in ~2 us (routing, 2 per SM) or ~4 us
//   (attention, 4 per SM) for 132 SMs to pull 4.2 TB/s; the estimated chain is launch + one HBM round trip
//   (~1-1.5 us under load) + scoring / softmax (~0.5 us) + the rank merge or P.V (~0.5-1 us) + fence and
//   counter (~0.5-1 us): ~3-4 us, hence ~3.5 TB/s rather than 4.2.
//   512K: routing 64 (b, kv) x 64 ranges = 4096 CTAs (7.8 waves of 528) reading 134 MB: ~38 us at
//     3.5 TB/s, plus the last range's list merge (448 entries per row, ~2 us) and the launch tail;
//     attention 64 x 32 entries x 2 chunks = 4096 CTAs, ~29 distinct blocks per kv head (random queries):
//     121 MB, ~35 us at 3.5 TB/s, plus ~2 us for the final merge. Step ~0.08 ms (target 0.138).
//   32K: routing 256 CTAs read 8.4 MB at once (one round trip + scoring, ~5 us), attention as at 512K
//     (~121 MB of K/V would be the same: the union does not depend on N): step ~0.045-0.05 ms (target 0.095).
//   128K: routing 1023 blocks -> 16 ranges per kv head, 34 MB, ~10 us; attention ~35 us: ~0.05 ms.
// Measured (H200, commit c9ce811, routing merged per tile by rank counts, 3 routing CTAs per SM): 512K step
//   0.239 ms, routing alone 0.177 (134 MB: 0.76 TB/s), attention ~0.062 (121 MB: 2.0 TB/s); 32K 0.086 ms
//   (routing 0.025, attention ~0.061); the fused kernel's routing took 0.101 at 512K. The attention met its
//   estimate's order; the routing did not: a rank count per candidate (each of RB + lcap candidates against
//   all others, in shared memory) cost several times a tile's loads. Since then a warp per row merges a tile
//   by lcap rounds of warp arg-max (a few hundred instructions per row instead of ~70 compares per candidate),
//   at 2 CTAs per SM (the merge's registers; 64 KB in flight per SM still covers Little's law), and a CTA
//   streams a range of tiles with the next tile's loads in flight. Measured after both (260d22a): 512K routing
//   0.147 ms (still under 1 TB/s; Nsight Compute: barrier stalls, 20% of DRAM peak), 32K 0.020 ms; so
//   moba_decode runs this kernel only up to 2048 candidate blocks. (The per-tile reset of the next lists
//   before the merge is redundant since the warp merge writes every entry; left until a GPU run can check
//   its removal.)
// Why bandwidth-first should get to ~3.5 TB/s where decode.cu did not: every CTA issues all of its loads
// before it uses any, there is no hand-over wait between CTAs (the kernel boundary is the only barrier), and
// 4 CTAs per SM overlap one CTA's scoring / softmax with the others' loads; decode.cu's 2 persistent CTAs per
// SM spent their time at barriers with one pipeline each.
// Costs this design accepts: one kernel boundary (~2-4 us of drain and start), the dedup scan (each
// attention CTA reads R * k selection ints from L2), and the routing ranges' list merge.
//
// Element conversion, the copies and loads, NaN / -inf and the dynamic shared memory come from
// decode_common.cuh (shared with decode.cu; under DEC_HOST_EMULATION the host harness supplies them).

#include "decode_common.cuh"

#define DSP_THREADS 256
#define DSP_WARPS (DSP_THREADS / 32)
#define DSP_FLAGS 64                   // bytes of flags at the start of shared memory
#define DSP_ROUTE_TILE_BYTES 32768     // block sums of one routing tile (64 at d 128, 128 at d 64)
#define DSP_ROUTE_MAX_ROWS 64          // rows of one routing row group
#define DSP_ROUTE_ILP 2                // query rows scored together (independent dependency chains)
#define DSP_ATTN_CHUNK 64              // most tokens of one attention CTA
#define DSP_ATTN_ROWS 4                // rows per pass over a chunk
#define DSP_MERGE_BATCH 8              // partials loaded together in the attention merge
#define DSP_ROUTE_MIN_CTAS 2           // __launch_bounds__ minimum CTAs per SM (<= 128 registers)
#define DSP_ATTN_MIN_CTAS 4

// ---- ranking ----
// Not decode.cu's dec_before / dec_warp_best: this kernel's per-lane scans compare (score, block) only (the
// blocks of one scan are distinct, so no position is needed), and its butterfly also orders two NaN entries
// by position. The outcomes agree wherever a caller reads them; the code, and so each kernel's measured
// machine code, differs, so both stay.

// (v, j) ranks before (w, i): higher score, then higher block index (the reference's tie rule); NaN (no
// candidate) ranks after everything. Block indices of the entries compared are distinct.
__device__ __forceinline__ bool dsp_before(float v, int j, float w, int i) {
    if (dec_isnan(v)) return false;
    if (dec_isnan(w)) return true;
    return v > w || (v == w && j > i);
}

// Warp-wide best (v, j, p), p the position (a total order, so every lane agrees on the winner).
__device__ __forceinline__ void dsp_warp_best(float& v, int& j, int& p) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(DEC_FULL, v, off);
        const int oj = __shfl_xor_sync(DEC_FULL, j, off);
        const int op = __shfl_xor_sync(DEC_FULL, p, off);
        const bool take = dec_isnan(v) ? (!dec_isnan(ov) || op < p)
                                       : (!dec_isnan(ov) && (ov > v || (ov == v && (oj > j || (oj == j && op < p)))));
        if (take) {
            v = ov;
            j = oj;
            p = op;
        }
    }
}

// ---- routing ----

// Shared memory: [flags] own [rpg] | (16-byte aligned) qs [rpg][D] fp32 | st [rpg][RB] fp32 | two lists
// (v [rpg][lcap] fp32, j [rpg][lcap]); the last CTA's merge reuses everything after `own` as per-warp staging
// of n_range * lcap (value, block) pairs.
template <typename T, int D>
__device__ __forceinline__ void dsp_route(const T* __restrict__ q, const float* __restrict__ sums,
                                          const int* __restrict__ lengths, int* __restrict__ sel,
                                          float* __restrict__ part_v, int* __restrict__ part_j,
                                          unsigned* __restrict__ counters, int q_len, int heads, int kv_heads,
                                          int n_blocks_cap, int block_size, int top_k, int n_rg, int rpg,
                                          int n_range, int tiles_per_range) {
    constexpr int NV = D / 32;                           // float4 vectors of one lane's slice of a block sum
    constexpr int RB = DSP_ROUTE_TILE_BYTES / (4 * D);   // block sums per tile
    constexpr int NP = RB / 32;                          // passes of 32 blocks (8 lanes each) per tile
    DEC_DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int item = blockIdx.x;
    const int grp = item / n_range, x = item - grp * n_range;  // grp = (b * kv_heads + kvh) * n_rg + rg
    const int rg = grp % n_rg, kvh = (grp / n_rg) % kv_heads, b = grp / (n_rg * kv_heads);
    const int group = heads / kv_heads, rows = group * q_len;
    const int r0 = rg * rpg, nr = min(rpg, rows - r0);
    const int lcap = top_k - 1;
    const int len = lengths[b];
    const int c_last = (len - 1) / block_size;  // own block of the last query: candidates lie below it
    const int per_range = tiles_per_range * RB;
    const int j_lo = x * per_range, j_hi = min(j_lo + per_range, c_last);

    int* flags = reinterpret_cast<int*>(smem);
    int* own = reinterpret_cast<int*>(smem + DSP_FLAGS);
    unsigned char* area = smem + dec_align16(DSP_FLAGS + 4 * rpg);
    float* qs = reinterpret_cast<float*>(area);
    float* st = qs + rpg * D;
    // Two lists (value, block) per row: the current one at parity `cur`, the next tile's merge into the other.
    float* lists = st + rpg * RB;
    const int lsz = 2 * rpg * lcap;  // words of one list pair
    int cur = 0;
    float* lv = lists;
    int* lj = reinterpret_cast<int*>(lv + rpg * lcap);

    // Own blocks, query rows (fp32), empty lists: after the first tile's loads are issued, so that the query
    // loads wait behind them instead of delaying them.
    auto init_rows = [&]() {
        for (int rr = tid; rr < nr; rr += DSP_THREADS) own[rr] = (len - q_len + (r0 + rr) / group) / block_size;
        for (int y = tid; y < nr * D; y += DSP_THREADS) {
            const int rr = y / D, e = y - rr * D, r = r0 + rr, i = r / group, g = r - i * group;
            qs[y] = dec_to_float(q[((long long)(b * q_len + i) * heads + kvh * group + g) * D + e]);
        }
        for (int y = tid; y < nr * lcap; y += DSP_THREADS) {
            lv[y] = dec_nan();
            lj[y] = -1;
        }
    };

    const float* bsum = sums + (long long)(b * kv_heads + kvh) * n_blocks_cap * D;
    const int n_tiles = (lcap > 0 && j_hi > j_lo) ? (j_hi - j_lo + RB - 1) / RB : 0;
    const int sub = lane >> 3, part = lane & 7;
    // Tile t's sums are loaded into registers (one float4 per lane and (pass, vector)) one tile ahead: the
    // loads of tile t + 1 are in flight while tile t is scored and merged, so a CTA keeps its sums streaming
    // (64 KB in flight per CTA) instead of waiting once per tile.
    // Lane (sub, part) of warp w holds the float4 vectors m * 8 + part of block p * 32 + w * 4 + sub.
    auto load_tile = [&](float4 (&sv)[NP][NV], int t) {
        const int t0 = j_lo + t * RB, nblk = min(RB, j_hi - t0);
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            const int col = p * 32 + warp * 4 + sub;
            const float4* src = reinterpret_cast<const float4*>(bsum + (long long)(t0 + min(col, nblk - 1)) * D);
#pragma unroll
            for (int m = 0; m < NV; ++m) sv[p][m] = dec_ld_stream(src + m * 8 + part);  // in range: clamped
        }
    };
    auto process_tile = [&](const float4 (&sv)[NP][NV], int t) {
        const int t0 = j_lo + t * RB, nblk = min(RB, j_hi - t0);
        if (t == 0) init_rows();
        {
            float* nv = lists + (cur ^ 1) * lsz;
            int* nj = reinterpret_cast<int*>(nv + rpg * lcap);
            for (int y = tid; y < nr * lcap; y += DSP_THREADS) {
                nv[y] = dec_nan();
                nj[y] = -1;
            }
        }
        __syncthreads();  // q rows, own blocks (first tile); the last rank pass is done with st
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            const int col = p * 32 + warp * 4 + sub, j = t0 + col;
            auto score_rows = [&](int rr0, auto n_const) {
                constexpr int NR = decltype(n_const)::value;
                float acc[NR];
#pragma unroll
                for (int a = 0; a < NR; ++a) {
                    const float* qrow = qs + (rr0 + a) * D;
                    acc[a] = 0.f;
#pragma unroll
                    for (int m = 0; m < NV; ++m) {
                        const float4 qv = *reinterpret_cast<const float4*>(qrow + (m * 8 + part) * 4);
                        acc[a] += qv.x * sv[p][m].x + qv.y * sv[p][m].y + qv.z * sv[p][m].z + qv.w * sv[p][m].w;
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
                        st[(rr0 + a) * RB + col] = (col < nblk && j < own[rr0 + a]) ? acc[a] : dec_nan();
                }
            };
            int rr = 0;
            for (; rr + DSP_ROUTE_ILP <= nr; rr += DSP_ROUTE_ILP) score_rows(rr, dec_int<DSP_ROUTE_ILP>());
            for (; rr < nr; ++rr) score_rows(rr, dec_int<1>());
        }
        __syncthreads();
        // Merge of the tile into the lists, one warp per row: a lane holds tile blocks lane + 32 m (RB / 32 of
        // them) and, below lcap, list entry lane; lcap rounds of warp arg-max (score desc, block desc) take the
        // best untaken candidate each. (A rank count per candidate, every candidate against all RB + lcap
        // others, cost several times the tile's scoring and loads.)
        float* nv = lists + (cur ^ 1) * lsz;
        int* nj = reinterpret_cast<int*>(nv + rpg * lcap);
        for (int rr = warp; rr < nr; rr += DSP_WARPS) {
            constexpr int NC = RB / 32 + 1;
            float cv[NC];  // tile block m: t0 + 32 m + lane; the last: list entry `lane`, block lj_lane
#pragma unroll
            for (int m = 0; m < NC - 1; ++m) cv[m] = st[rr * RB + m * 32 + lane];
            cv[NC - 1] = lane < lcap ? lv[rr * lcap + lane] : dec_nan();
            const int lj_lane = lane < lcap ? lj[rr * lcap + lane] : -1;
            for (int rank = 0; rank < lcap; ++rank) {
                float v = dec_nan();
                int j = -1, p = 0x7fffffff;
#pragma unroll
                for (int m = 0; m < NC; ++m) {
                    const int jm = m < NC - 1 ? t0 + m * 32 + lane : lj_lane;
                    if (dsp_before(cv[m], jm, v, j)) {
                        v = cv[m];
                        j = jm;
                        p = lane;
                    }
                }
                dsp_warp_best(v, j, p);
                if (lane == 0) {
                    nv[rr * lcap + rank] = v;
                    nj[rr * lcap + rank] = dec_isnan(v) ? -1 : j;
                }
                if (dec_isnan(v)) {  // no candidate left: the rest of the list stays empty
                    for (int r2 = rank + 1 + lane; r2 < lcap; r2 += 32) {
                        nv[rr * lcap + r2] = dec_nan();
                        nj[rr * lcap + r2] = -1;
                    }
                    break;
                }
#pragma unroll
                for (int m = 0; m < NC; ++m)
                    if (cv[m] == v && (m < NC - 1 ? t0 + m * 32 + lane : lj_lane) == j) cv[m] = dec_nan();
            }
        }
        __syncthreads();
        cur ^= 1;
        lv = nv;
        lj = nj;
    };
    {
        float4 sa[NP][NV], sb[NP][NV];
        if (n_tiles > 0) load_tile(sa, 0);
        for (int t = 0; t < n_tiles; t += 2) {
            if (t + 1 < n_tiles) load_tile(sb, t + 1);
            process_tile(sa, t);
            if (t + 1 < n_tiles) {
                if (t + 2 < n_tiles) load_tile(sa, t + 2);
                process_tile(sb, t + 1);
            }
        }
    }
    if (n_tiles == 0) init_rows();
    __syncthreads();  // own blocks and lists complete when there was no tile

    const long long sel_b = (long long)b * q_len * heads;
    auto sel_row = [&](int r) {
        const int i = r / group, g = r - i * group;
        return sel + (sel_b + (long long)i * heads + kvh * group + g) * top_k;
    };
    if (n_range == 1) {  // the list is the row's selection, in rank order (-1 where it ran out)
        for (int y = tid; y < nr * top_k; y += DSP_THREADS) {
            const int rr = y / top_k, s = y - rr * top_k;
            sel_row(r0 + rr)[s] = s == 0 ? own[rr] : lj[rr * lcap + s - 1];
        }
        return;
    }
    const long long mine = ((long long)grp * n_range + x) * rpg * lcap;
    for (int y = tid; y < nr * lcap; y += DSP_THREADS) {
        part_v[mine + y] = lv[y];
        part_j[mine + y] = lj[y];
    }
    __threadfence();
    __syncthreads();
    unsigned* counter = counters + grp;
    if (tid == 0) flags[0] = atomicAdd(counter, 1u) == (unsigned)(n_range - 1);
    __syncthreads();
    if (!flags[0]) return;
    __threadfence();

    // Last range of the row group: lcap rounds of warp arg-max over the n_range lists of each row.
    const int n = n_range * lcap;
    float* mv = reinterpret_cast<float*>(area) + warp * 2 * n;
    int* mj = reinterpret_cast<int*>(mv + n);
    for (int rr = warp; rr < nr; rr += DSP_WARPS) {
        for (int e = lane; e < n; e += 32) {
            const int xr = e / lcap, s = e - xr * lcap;
            const long long off = ((long long)grp * n_range + xr) * rpg * lcap + (long long)rr * lcap + s;
            mv[e] = dec_ldcg(part_v + off);
            mj[e] = dec_ldcg(part_j + off);
        }
        __syncwarp();
        int my_j = -1;
        for (int s = 0; s < lcap; ++s) {
            float bv = dec_nan();
            int bj = -1, bp = 0x7fffffff;
            for (int e = lane; e < n; e += 32) {
                const float v = mv[e];
                const int j = mj[e];
                if (dsp_before(v, j, bv, bj)) {
                    bv = v;
                    bj = j;
                    bp = e;
                }
            }
            dsp_warp_best(bv, bj, bp);
            const bool found = !dec_isnan(bv);
            if (lane == s && found) my_j = bj;
            if (lane == 0 && found) mv[bp] = dec_nan();
            __syncwarp();
        }
        int* srow = sel_row(r0 + rr);
        if (lane == 0) srow[0] = own[rr];
        if (lane < lcap) srow[1 + lane] = my_j;
        __syncwarp();
    }
    if (tid == 0) *counter = 0u;
}

// ---- attention ----

// Shared memory: [flags] rl [R] (entries that selected the CTA's block) | (16-byte aligned) qs [ROWS][D]
// fp32 | S [ROWS][CHUNK] fp32 | tl [ROWS] | red [WARPS][ROWS][D] fp32 (the final merge's per-warp weights
// reuse it) | (16-byte aligned) K [chunk][D] T | V [chunk][D] T.
template <typename T, int D>
__device__ __forceinline__ void dsp_attend(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const int* __restrict__ lengths,
                                           const int* __restrict__ sel, float* __restrict__ part_o,
                                           float* __restrict__ part_ml, unsigned* __restrict__ counters,
                                           T* __restrict__ out, float* __restrict__ lse, int q_len, int heads,
                                           int kv_heads, int capacity, int block_size, int top_k, int n_chunks,
                                           int chunk, float scale_log2) {
    constexpr int CPL = D / 32;  // columns per lane in P.V and the merge
    constexpr int ROWS = DSP_ATTN_ROWS;
    constexpr int CH = DSP_ATTN_CHUNK;
    DEC_DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = heads / kv_heads, R = group * q_len, E = R * top_k, nc = n_chunks;
    const int item = blockIdx.x;
    const int c = item % nc, rest = item / nc, e = rest % E, g = rest / E;  // g = b * kv_heads + kvh
    const int b = g / kv_heads, kvh = g - b * kv_heads;
    const int len = lengths[b];

    int* flags = reinterpret_cast<int*>(smem);  // [0] another CTA owns the block, [1] rows, [2] last CTA
    int* rl = reinterpret_cast<int*>(smem + DSP_FLAGS);
    float* qs = reinterpret_cast<float*>(smem + dec_align16(DSP_FLAGS + 4 * R));
    float* S = qs + ROWS * D;
    int* tl = reinterpret_cast<int*>(S + ROWS * CH);
    float* red = reinterpret_cast<float*>(tl + ROWS);
    T* ks = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(red) + DSP_WARPS * ROWS * D * 4);
    T* vs = ks + chunk * D;

    const long long sel_b = (long long)b * q_len * heads;
    auto sel_at = [&](int ee) {  // entry ee of this kv head (written by the routing launch)
        const int r = ee / top_k, s = ee - r * top_k, i = r / group, gg = r - i * group;
        return sel[(sel_b + (long long)i * heads + kvh * group + gg) * top_k + s];
    };
    if (tid == 0) {
        flags[0] = 0;
        flags[1] = 0;
    }
    const int j = sel_at(e);
    __syncthreads();
    // The kv head's entries that name j (loaded alongside j: one round trip to L2).
    for (int ee = tid; ee < E; ee += DSP_THREADS) {
        if (sel_at(ee) != j || j < 0) continue;
        if (ee < e)
            flags[0] = 1;  // an earlier entry owns (j, c)
        else
            rl[atomicAdd(flags + 1, 1)] = ee;  // a row selects a block at most once: <= R entries
    }
    __syncthreads();
    if (j >= 0 && !flags[0]) {
        const int nrow = flags[1];
        const int tok0 = j * block_size + c * chunk;
        const int nvalid = max(0, min(chunk, len - tok0));
        const long long src = ((long long)g * capacity + tok0) * D;
        dec_issue_kv_chunk<T, D, DSP_THREADS>(ks, vs, k, v, src, chunk, nvalid, tid);
        dec_cp_async_commit();
        for (int rb0 = 0; rb0 < nrow; rb0 += ROWS) {
            const int nb = min(ROWS, nrow - rb0);
            if (rb0 > 0) __syncthreads();  // the last pass is done with qs, S and red
            for (int y = tid; y < nb * D; y += DSP_THREADS) {
                const int rr = y / D, d = y - rr * D, r = rl[rb0 + rr] / top_k, i = r / group, gg = r - i * group;
                qs[y] = dec_to_float(q[((long long)(b * q_len + i) * heads + kvh * group + gg) * D + d]);
            }
            for (int rr = tid; rr < nb; rr += DSP_THREADS) tl[rr] = len - q_len + (rl[rb0 + rr] / top_k) / group;
            if (rb0 == 0) dec_cp_async_wait<0>();
            __syncthreads();

            // S = scale * log2(e) * q . k, -inf after the row's position. 8 lanes per (row, token); nb * chunk
            // is a multiple of 16, so the 4 groups of a warp run the same iterations.
            {
                const int grp8 = tid >> 3, part = tid & 7;
                for (int pp = grp8; pp < nb * chunk; pp += DSP_THREADS / 8) {
                    const int rr = pp / chunk, tk = pp - rr * chunk;
                    float acc = 0.f;
#pragma unroll
                    for (int m = 0; m < D / 64; ++m) {
                        const int e0 = (m * 8 + part) * 8;
                        const uint4 u = *reinterpret_cast<const uint4*>(ks + tk * D + e0);
                        float kf[8];
                        dec_unpack8<T>(u, kf);
                        const float4 qa = *reinterpret_cast<const float4*>(qs + rr * D + e0);
                        const float4 qb = *reinterpret_cast<const float4*>(qs + rr * D + e0 + 4);
                        acc += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                               qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
                    }
                    acc += __shfl_xor_sync(DEC_FULL, acc, 1);
                    acc += __shfl_xor_sync(DEC_FULL, acc, 2);
                    acc += __shfl_xor_sync(DEC_FULL, acc, 4);
                    if (part == 0) S[rr * CH + tk] = tok0 + tk <= tl[rr] ? acc * scale_log2 : dec_neg_inf();
                }
            }
            __syncthreads();

            // Warp rr: m = max, P = 2^(S - m) in place, l = sum P (all -inf: m = -inf, P = 0, l = 0).
            if (warp < nb) {
                float* srow = S + warp * CH;
                float mx = dec_neg_inf();
                for (int tk = lane; tk < chunk; tk += 32) mx = fmaxf(mx, srow[tk]);
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, off));
                float l = 0.f;
                for (int tk = lane; tk < chunk; tk += 32) {
                    const float pr = mx == dec_neg_inf() ? 0.f : exp2f(srow[tk] - mx);
                    srow[tk] = pr;
                    l += pr;
                }
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(DEC_FULL, l, off);
                if (lane == 0) {
                    const int ent = rl[rb0 + warp], r = ent / top_k, s = ent - r * top_k;
                    const long long pi = (((long long)g * R + r) * top_k + s) * nc + c;
                    part_ml[2 * pi] = mx;
                    part_ml[2 * pi + 1] = l;
                }
            }
            __syncthreads();

            // o = P . V: warp w takes tokens w, w + 8, ..., lane columns lane * CPL ..; sums over warps in red.
            {
                float o[ROWS][CPL];
#pragma unroll
                for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
                    for (int a = 0; a < CPL; ++a) o[rr][a] = 0.f;
                for (int tk = warp; tk < chunk; tk += DSP_WARPS) {
                    float vf[CPL];
                    dec_load_cols<T, CPL>(vs + tk * D + lane * CPL, vf);
#pragma unroll
                    for (int rr = 0; rr < ROWS; ++rr) {
                        if (rr < nb) {
                            const float pr = S[rr * CH + tk];
#pragma unroll
                            for (int a = 0; a < CPL; ++a) o[rr][a] += pr * vf[a];
                        }
                    }
                }
#pragma unroll
                for (int rr = 0; rr < ROWS; ++rr) {
                    if (rr < nb) {
#pragma unroll
                        for (int a = 0; a < CPL; ++a) red[(warp * ROWS + rr) * D + lane * CPL + a] = o[rr][a];
                    }
                }
            }
            __syncthreads();
            for (int y = tid; y < nb * D; y += DSP_THREADS) {
                const int rr = y / D, d = y - rr * D;
                float sum = 0.f;
#pragma unroll
                for (int w = 0; w < DSP_WARPS; ++w) sum += red[(w * ROWS + rr) * D + d];
                const int ent = rl[rb0 + rr], r = ent / top_k, s = ent - r * top_k;
                part_o[((((long long)g * R + r) * top_k + s) * nc + c) * D + d] = sum;
            }
        }
    }

    __threadfence();
    __syncthreads();
    unsigned* counter = counters + g;
    if (tid == 0) flags[2] = atomicAdd(counter, 1u) == (unsigned)(E * nc - 1);
    __syncthreads();
    if (!flags[2]) return;
    __threadfence();

    // Last CTA of (b, kv head): one warp per row merges its top_k * n_chunks partials with weights
    // w = 2^(m - M) / L (0 for unused slots and for chunks no key of the row reaches).
    const int per_row = top_k * nc;
    float* wrow = red + warp * per_row;
    for (int r = warp; r < R; r += DSP_WARPS) {
        const long long p0 = ((long long)g * R + r) * per_row;
        float mx = dec_neg_inf();
        for (int sc = lane; sc < per_row; sc += 32) {
            const bool used = sel_at(r * top_k + sc / nc) >= 0;
            const float m = used ? dec_ldcg(part_ml + 2 * (p0 + sc)) : dec_neg_inf();
            wrow[sc] = m;
            mx = fmaxf(mx, m);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, off));
        float l = 0.f;
        for (int sc = lane; sc < per_row; sc += 32) {
            const float m = wrow[sc];
            const float w = m == dec_neg_inf() ? 0.f : exp2f(m - mx);
            wrow[sc] = w;
            if (w != 0.f) l += w * dec_ldcg(part_ml + 2 * (p0 + sc) + 1);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(DEC_FULL, l, off);
        __syncwarp();
        const float inv = 1.f / l;
        float o[CPL];
#pragma unroll
        for (int a = 0; a < CPL; ++a) o[a] = 0.f;
        // DSP_MERGE_BATCH partials per round trip to L2; a zero weight loads nothing (its partial may be unwritten).
        for (int sc0 = 0; sc0 < per_row; sc0 += DSP_MERGE_BATCH) {
            float w[DSP_MERGE_BATCH], po[DSP_MERGE_BATCH][CPL];
#pragma unroll
            for (int a = 0; a < DSP_MERGE_BATCH; ++a) {
                w[a] = sc0 + a < per_row ? wrow[sc0 + a] : 0.f;
                const float* src = part_o + (p0 + sc0 + a) * D + lane * CPL;
                if constexpr (CPL == 4) {
                    const float4 u = w[a] != 0.f ? dec_ldcg(reinterpret_cast<const float4*>(src))
                                                 : make_float4(0.f, 0.f, 0.f, 0.f);
                    po[a][0] = u.x;
                    po[a][1] = u.y;
                    po[a][CPL - 2] = u.z;
                    po[a][CPL - 1] = u.w;
                } else {
                    po[a][0] = w[a] != 0.f ? dec_ldcg(src) : 0.f;
                    po[a][CPL - 1] = w[a] != 0.f ? dec_ldcg(src + 1) : 0.f;
                }
            }
#pragma unroll
            for (int a = 0; a < DSP_MERGE_BATCH; ++a)
#pragma unroll
                for (int x = 0; x < CPL; ++x) o[x] += w[a] * po[a][x];
        }
        const int i = r / group, gg = r - i * group;
        const long long row = (long long)(b * q_len + i) * heads + kvh * group + gg;
        T* dst = out + row * D + lane * CPL;
        if constexpr (CPL == 4) {
            *reinterpret_cast<uint2*>(dst) = make_uint2(dec_pack2(o[0] * inv, o[1] * inv, T()),
                                                       dec_pack2(o[CPL - 2] * inv, o[CPL - 1] * inv, T()));
        } else {
            *reinterpret_cast<unsigned*>(dst) = dec_pack2(o[0] * inv, o[CPL - 1] * inv, T());
        }
        if (lane == 0) lse[row] = (mx + log2f(l)) * 0.69314718055994531f;
        __syncwarp();
    }
    if (tid == 0) *counter = 0u;
}

// ---- entry points: one macro per kernel with a literal parameter list, one line per dtype x head dim
// (_launch.check_args expands the macros to read the signatures) ----

#define MOBA_DECODE_ROUTE_KERNEL(NAME, T, D)                                                                      \
  extern "C" __global__ void __launch_bounds__(DSP_THREADS, DSP_ROUTE_MIN_CTAS) NAME(                             \
      const T* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,                   \
      int* __restrict__ sel, float* __restrict__ part_v, int* __restrict__ part_j,                                \
      unsigned* __restrict__ counters, int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size,      \
      int top_k, int n_rg, int rows_per_group, int n_range, int tiles_per_range) {                                \
    dsp_route<T, D>(q, sums, lengths, sel, part_v, part_j, counters, q_len, heads, kv_heads, n_blocks_cap,        \
                    block_size, top_k, n_rg, rows_per_group, n_range, tiles_per_range);                           \
  }

#define MOBA_DECODE_ATTEND_KERNEL(NAME, T, D)                                                                     \
  extern "C" __global__ void __launch_bounds__(DSP_THREADS, DSP_ATTN_MIN_CTAS) NAME(                              \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ lengths, \
      const int* __restrict__ sel, float* __restrict__ part_o, float* __restrict__ part_ml,                       \
      unsigned* __restrict__ counters, T* __restrict__ out, float* __restrict__ lse, int q_len, int heads,        \
      int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk, float scale_log2) {         \
    dsp_attend<T, D>(q, k, v, lengths, sel, part_o, part_ml, counters, out, lse, q_len, heads, kv_heads,          \
                     capacity, block_size, top_k, n_chunks, chunk, scale_log2);                                   \
  }

MOBA_DECODE_ROUTE_KERNEL(moba_decode_route_bf16_d64,  __nv_bfloat16,  64)
MOBA_DECODE_ROUTE_KERNEL(moba_decode_route_bf16_d128, __nv_bfloat16, 128)
MOBA_DECODE_ROUTE_KERNEL(moba_decode_route_fp16_d64,  __half,         64)
MOBA_DECODE_ROUTE_KERNEL(moba_decode_route_fp16_d128, __half,        128)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_bf16_d64,  __nv_bfloat16,  64)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_bf16_d128, __nv_bfloat16, 128)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_fp16_d64,  __half,         64)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_fp16_d128, __half,        128)
