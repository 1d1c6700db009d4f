// MoBA decode over a KV cache: routing over the cached block key sums, then split-KV attention over the
// selected blocks. Two kernels per step; each finishes with a merge done by the last CTA of its group
// (a per-group completion counter), so a step is two launches.
//
// Layouts (all contiguous):
//   q        (b, q_len, heads, D) T           queries of the newest q_len tokens of every sequence
//   k, v     (b, kv_heads, capacity, D) T     the cache, head-major: one block of one kv head is one slab
//   sums     (b, kv_heads, n_blocks_cap, D)   fp32 running key sums S_j of every block (MobaKVCache)
//   lengths  (b,) int32                       L_b, tokens held per sequence
//   sel      (b, q_len, heads, top_k) int32   slot 0 own block, then k-1 past blocks, -1 unused
//   out      (b, q_len, heads, D) T, lse (b, q_len, heads) fp32 (natural log)
// Query i of sequence b sits at t = L_b - q_len + i. Rows of one kv head kh: r = i * G + g (G = heads /
// kv_heads, query head kh * G + g), R = G * q_len rows.
//
// Routing (moba_decode_route_*): grid (n_split, kv_heads * n_rg, b), 256 threads. A CTA scores the rows of
// one row group (<= 64 rows) against a contiguous range of candidate blocks, so every block sum is read
// once per kv head for all heads of the group and all q_len positions (once per row group beyond 64 rows).
// Candidates are complete blocks (j < own block), |j| = B is a power of two, so ranking by q . S_j equals
// ranking by q . (S_j / B) exactly: the score is the fp32 dot product with the running sum. 8 lanes share a
// block (16-byte loads, 3 shuffles); scores of a tile of 128 blocks go to shared memory, and every score that
// beats the last entry of the row's sorted list of the best k-1 (score desc, block desc) is inserted at its
// rank (past the first tiles few do). The last CTA of a (b, kv head, row group) merges the n_split lists
// per row by repeated warp arg-max and writes sel.
//
// Attention (moba_decode_attn_*): grid (R * top_k * n_chunks, kv_heads, b), 128 threads. Unit (e = r * top_k
// + s, chunk c) handles block j = sel[r][s] only when e is the first entry that selected j (the union of
// the group's selections, each block loaded once); it loads the chunk's <= 64 tokens of K and V with
// 16-byte cp.async (zero-filled beyond L_b), and for every row that selected j computes the partial
// softmax (m, l) and the unnormalised o over the chunk (keys > t masked), written to slot (r, s, c). The
// last CTA of a (b, kv head) merges each row's k * n_chunks partials: M = max m, L = sum l 2^(m - M),
// out = sum o 2^(m - M) / L, lse = (M + log2 L) ln 2. Scores are in base 2 (scale * log2 e folded in).
//
// Bytes one step needs (HBM), per sequence and kv head, n_p = floor((L - 1) / B) past blocks of the last
// query, U = blocks in the union of the group's selections:
//   sums 4 * n_p * D * ceil(R / 64)  +  K, V 2 * 2 * U * B * D (own block: its real tokens)  +  q, out
//   2 * 2 * R * D. Scratch (sel, lists, partials) is small and stays in L2.
//   Example, L = 512K, b 8, 32 / 8 heads, D 128, B 128, k 8, bf16: sums 134 MB, K/V 33.5 MB (U = 8 when
//   the 4 heads of a group agree) to 121 MB (U ~ 29, independent choices as on random data), q/out 0.13
//   MB: 168-255 MB against 17.2 GB that dense decode reads (the whole cache), 67-102x fewer bytes.
// FLOPs: routing 2 * b * heads * q_len * n_p * D, attention 4 * b * heads * q_len * |S_t| * D with
//   |S_t| <= k * B; the example: 268 + 134 MFLOP, ~1.6 FLOP per byte: memory-bound, so CUDA cores
//   (exact fp32 scores) rather than tensor cores.
//
// Host emulation (tests): DEC_HOST_EMULATION replaces the CUDA headers, the PTX helpers (cp.async, ld.cg)
// and the dynamic shared-memory declaration, so that the same kernel bodies run on host threads.

#ifndef DEC_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define DEC_FULL 0xffffffffu
#define DEC_ROUTE_THREADS 256
#define DEC_ROUTE_WARPS (DEC_ROUTE_THREADS / 32)
#define DEC_ROUTE_TILE 128  // blocks scored per tile (4 per warp and iteration: 4 iterations)
#define DEC_ATTN_THREADS 128
#define DEC_ATTN_WARPS (DEC_ATTN_THREADS / 32)
#define DEC_ATTN_CHUNK 64  // most tokens of one attention unit
#define DEC_ATTN_ROWS 16   // rows per pass of an attention unit
#define DEC_ATTN_RB 4      // rows accumulated together in P.V
#define DEC_ATTN_MAX_ROWS 512

#ifndef DEC_DYNAMIC_SMEM
#define DEC_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- 16-bit element types ----

__device__ __forceinline__ float dec_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float dec_to_float(__half x) { return __half2float(x); }

// One 16-byte vector of 8 elements -> 8 floats (bf16 is the top half of an fp32: exact shifts).
__device__ __forceinline__ void dec_unpack8(const uint4& u, float (&f)[8], __nv_bfloat16) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = __uint_as_float(w[e] << 16);
        f[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
    }
}
__device__ __forceinline__ void dec_unpack8(const uint4& u, float (&f)[8], __half) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = __half2float(__ushort_as_half((unsigned short)(w[e] & 0xffffu)));
        f[2 * e + 1] = __half2float(__ushort_as_half((unsigned short)(w[e] >> 16)));
    }
}

__device__ __forceinline__ unsigned dec_pack2(float a, float b, __nv_bfloat16) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(a)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(b)) << 16);
}
__device__ __forceinline__ unsigned dec_pack2(float a, float b, __half) {
    return (unsigned)__half_as_ushort(__float2half_rn(a)) | ((unsigned)__half_as_ushort(__float2half_rn(b)) << 16);
}

#ifndef DEC_HOST_EMULATION
// 16-byte global -> shared copy that bypasses L1 (the data is read once).
__device__ __forceinline__ void dec_cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
// Wait for every cp.async this thread issued (a __syncthreads must follow before others read).
__device__ __forceinline__ void dec_cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}
// Loads of what other CTAs of this grid wrote (after the completion counter): from L2, never a stale L1 line.
__device__ __forceinline__ float dec_ldcg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ int dec_ldcg(const int* p) {
    int v;
    asm volatile("ld.global.cg.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ float4 dec_ldcg(const float4* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}
#endif

__device__ __forceinline__ float dec_nan() { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ float dec_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ bool dec_isnan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

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

// One warp merges a tile of scores of one row (srow[e] for block t0 + e, NaN where no candidate) into the
// row's sorted list (lrow / jrow, lcap entries, best first): lane s < lcap holds entry s; every score that
// ranks before the current last entry is inserted at its rank, the entries behind it move down one lane.
// Past the first tiles few scores qualify, so a tile costs little more than one compare per score.
__device__ __forceinline__ void dec_merge_tile(const float* srow, int t0, float* lrow, int* jrow, int lcap,
                                               int lane) {
    float lv = lane < lcap ? lrow[lane] : dec_neg_inf();
    int lj = lane < lcap ? jrow[lane] : -1;
    float tv = __shfl_sync(DEC_FULL, lv, lcap - 1);
    int tj = __shfl_sync(DEC_FULL, lj, lcap - 1);
    for (int e0 = 0; e0 < DEC_ROUTE_TILE; e0 += 32) {
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

// ---- routing ----

// Shared memory (dynamic): [16 B flags] then qs [rpg][D] fp32 | S [rpg][TILE] | lv [rpg][lcap] fp32 |
// lj [rpg][lcap] int | own [rpg] int; the last CTA reuses everything after the flags as per-warp staging
// of n_split * lcap (value, block) pairs.
template <typename T, int D>
__device__ __forceinline__ void dec_route_body(const T* __restrict__ q, const float* __restrict__ sums,
                                               const int* __restrict__ lengths, int* __restrict__ sel,
                                               float* __restrict__ part_v, int* __restrict__ part_j,
                                               unsigned* __restrict__ counters, int q_len, int heads,
                                               int kv_heads, int n_blocks_cap, int block_size, int top_k,
                                               int n_rg, int rows_per_group, int n_split, int blocks_per_split) {
    DEC_DYNAMIC_SMEM(dec_smem);
    constexpr int NV = D / 32;  // float4 vectors of one lane's slice of a block sum (8 lanes per block)
    constexpr int ITERS = DEC_ROUTE_TILE / (4 * DEC_ROUTE_WARPS);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, kvh = blockIdx.y / n_rg, rg = blockIdx.y % n_rg, b = blockIdx.z;
    const int group = heads / kv_heads;
    const int rows = group * q_len;
    const int r0 = rg * rows_per_group;
    const int nr = min(rows_per_group, rows - r0);
    const int lcap = top_k - 1;
    const int len = lengths[b];
    const int c_last = (len - 1) / block_size;  // own block of the last query: candidates lie below it
    const int j_lo = split * blocks_per_split;
    const int j_hi = min(j_lo + blocks_per_split, c_last);

    int* flags = reinterpret_cast<int*>(dec_smem);
    float* qs = reinterpret_cast<float*>(dec_smem + 16);
    float* S = qs + rows_per_group * D;
    float* lv = S + rows_per_group * DEC_ROUTE_TILE;
    int* lj = reinterpret_cast<int*>(lv + rows_per_group * lcap);
    int* own = lj + rows_per_group * lcap;

    for (int x = tid; x < nr * D; x += DEC_ROUTE_THREADS) {
        const int rr = x / D, e = x % D, r = r0 + rr, i = r / group, g = r % group;
        qs[x] = dec_to_float(q[((long long)(b * q_len + i) * heads + kvh * group + g) * D + e]);
    }
    for (int rr = tid; rr < nr; rr += DEC_ROUTE_THREADS) own[rr] = (len - q_len + (r0 + rr) / group) / block_size;
    for (int x = tid; x < nr * lcap; x += DEC_ROUTE_THREADS) {
        lv[x] = dec_neg_inf();
        lj[x] = -1;
    }
    __syncthreads();

    const float* bsum = sums + (long long)(b * kv_heads + kvh) * n_blocks_cap * D;
    const int sub = lane >> 3, part = lane & 7;
    if (lcap > 0) {
        // Lane (sub, part) of warp w scores block t0 + (it * WARPS + w) * 4 + sub of each tile, holding the
        // float4 vectors m * 8 + part of its sum (each 8-lane load is 128 contiguous bytes). The next block's
        // vectors are loaded while the current one is scored, also across tiles, so loads stay in flight
        // while the lists are merged.
        float4 cur[NV], nxt[NV];
        {
            const int j = j_lo + warp * 4 + sub;
#pragma unroll
            for (int m = 0; m < NV; ++m)
                cur[m] = j < j_hi ? *reinterpret_cast<const float4*>(bsum + (long long)j * D + (m * 8 + part) * 4)
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        for (int t0 = j_lo; t0 < j_hi; t0 += DEC_ROUTE_TILE) {
#pragma unroll
            for (int it = 0; it < ITERS; ++it) {
                const int col = (it * DEC_ROUTE_WARPS + warp) * 4 + sub;
                const int j = t0 + col;
                const int jn = j + 4 * DEC_ROUTE_WARPS;  // next iteration's block (the next tile's after the last)
#pragma unroll
                for (int m = 0; m < NV; ++m)
                    nxt[m] = jn < j_hi ? *reinterpret_cast<const float4*>(bsum + (long long)jn * D + (m * 8 + part) * 4)
                                       : make_float4(0.f, 0.f, 0.f, 0.f);
                for (int rr = 0; rr < nr; ++rr) {
                    const float* qrow = qs + rr * D;
                    float acc = 0.f;
#pragma unroll
                    for (int m = 0; m < NV; ++m) {
                        const float4 qv = *reinterpret_cast<const float4*>(qrow + (m * 8 + part) * 4);
                        acc += qv.x * cur[m].x + qv.y * cur[m].y + qv.z * cur[m].z + qv.w * cur[m].w;
                    }
                    acc += __shfl_xor_sync(DEC_FULL, acc, 1);
                    acc += __shfl_xor_sync(DEC_FULL, acc, 2);
                    acc += __shfl_xor_sync(DEC_FULL, acc, 4);
                    if (part == 0) S[rr * DEC_ROUTE_TILE + col] = (j < j_hi && j < own[rr]) ? acc : dec_nan();
                }
#pragma unroll
                for (int m = 0; m < NV; ++m) cur[m] = nxt[m];
            }
            __syncthreads();
            for (int rr = warp; rr < nr; rr += DEC_ROUTE_WARPS)
                dec_merge_tile(S + rr * DEC_ROUTE_TILE, t0, lv + rr * lcap, lj + rr * lcap, lcap, lane);
            __syncthreads();
        }
    }

    // This split's lists: part[b][kvh][rg][split][row][lcap].
    const long long grp = (long long)(b * kv_heads + kvh) * n_rg + rg;
    const long long mine = (grp * n_split + split) * rows_per_group * lcap;
    for (int x = tid; x < nr * lcap; x += DEC_ROUTE_THREADS) {
        part_v[mine + x] = lv[x];
        part_j[mine + x] = lj[x];
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const unsigned done = atomicAdd(counters + grp, 1u);
        flags[0] = done == (unsigned)(n_split - 1);
    }
    __syncthreads();
    if (!flags[0]) return;
    __threadfence();

    // Last CTA of the group: merge the n_split lists of every row, write sel, reset the counter.
    const int n = n_split * lcap;
    float* mv = reinterpret_cast<float*>(dec_smem + 16) + warp * 2 * n;
    int* mj = reinterpret_cast<int*>(mv + n);
    for (int rr = warp; rr < nr; rr += DEC_ROUTE_WARPS) {
        for (int e = lane; e < n; e += 32) {
            const long long off = (grp * n_split + e / lcap) * rows_per_group * lcap + (long long)rr * lcap + e % lcap;
            mv[e] = dec_ldcg(part_v + off);
            mj[e] = dec_ldcg(part_j + off);
        }
        __syncwarp();
        float my_v;
        int my_j;
        dec_warp_select(mv, mj, n, lcap, lane, my_v, my_j);
        const int r = r0 + rr, i = r / group, g = r % group;
        int* srow = sel + ((long long)(b * q_len + i) * heads + kvh * group + g) * top_k;
        if (lane == 0) srow[0] = (len - q_len + i) / block_size;
        if (lane < lcap) srow[1 + lane] = my_j;
        __syncwarp();
    }
    if (tid == 0) counters[grp] = 0u;
}

// ---- attention ----

// Selection entry e = r * top_k + s of kv head kvh (sel_b: this sequence's (q_len, heads, top_k) slab).
__device__ __forceinline__ int dec_sel_entry(const int* sel_b, int e, int top_k, int group, int heads, int kvh) {
    const int r = e / top_k, s = e - r * top_k, i = r / group, g = r - i * group;
    return sel_b[((long long)i * heads + kvh * group + g) * top_k + s];
}

// Shared memory (dynamic): [16 B flags: 0 duplicate, 1 row count, 2 last] Ks [CHUNK][D] T | Vs [CHUNK][D] T |
// qs [ROWS][D] fp32 (reused as the P.V reduction buffer [WARPS][RB][D]) | S [ROWS][CHUNK] fp32 |
// ml [ROWS][2] | tl [ROWS] int | rowlist [MAX_ROWS] int.
template <typename T, int D>
__device__ __forceinline__ void dec_attn_body(const T* __restrict__ q, const T* __restrict__ kc,
                                              const T* __restrict__ vc, const int* __restrict__ lengths,
                                              const int* __restrict__ sel, float* __restrict__ part_o,
                                              float* __restrict__ part_ml, unsigned* __restrict__ counters,
                                              T* __restrict__ out, float* __restrict__ lse, int q_len, int heads,
                                              int kv_heads, int capacity, int block_size, int top_k, int n_chunks,
                                              int chunk, float scale_log2) {
    DEC_DYNAMIC_SMEM(dec_smem);
    constexpr int VEC = D / 8;                     // 16-byte vectors per K/V row
    constexpr int TG = DEC_ATTN_THREADS / VEC;     // token groups in P.V
    static_assert(DEC_ATTN_WARPS * DEC_ATTN_RB == DEC_ATTN_ROWS, "the P.V buffer reuses the q tile");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kvh = blockIdx.y, b = blockIdx.z;
    const int unit = blockIdx.x / n_chunks, c = blockIdx.x % n_chunks;
    const int group = heads / kv_heads, rows = group * q_len, entries = rows * top_k;
    const int len = lengths[b];
    const int* sel_b = sel + (long long)b * q_len * heads * top_k;

    int* flags = reinterpret_cast<int*>(dec_smem);
    T* Ks = reinterpret_cast<T*>(dec_smem + 16);
    T* Vs = Ks + DEC_ATTN_CHUNK * D;
    float* qs = reinterpret_cast<float*>(Vs + DEC_ATTN_CHUNK * D);
    float* S = qs + DEC_ATTN_ROWS * D;
    float* ml = S + DEC_ATTN_ROWS * DEC_ATTN_CHUNK;
    int* tl = reinterpret_cast<int*>(ml + 2 * DEC_ATTN_ROWS);
    int* rowlist = tl + DEC_ATTN_ROWS;

    const int j = dec_sel_entry(sel_b, unit, top_k, group, heads, kvh);
    if (tid == 0) {
        flags[0] = 0;
        flags[1] = 0;
    }
    __syncthreads();
    if (j >= 0) {
        // The rows that attend block j; an earlier entry with the same block makes another unit its owner.
        for (int e = tid; e < entries; e += DEC_ATTN_THREADS) {
            if (dec_sel_entry(sel_b, e, top_k, group, heads, kvh) == j) {
                if (e < unit)
                    flags[0] = 1;
                else
                    rowlist[atomicAdd(flags + 1, 1)] = e;
            }
        }
    }
    __syncthreads();
    const bool work = j >= 0 && flags[0] == 0;
    const int nrows = flags[1];
    const int tok0 = j * block_size + c * chunk;

    if (work) {
        const int nvalid = max(0, min(chunk, len - tok0));
        const long long base = ((long long)(b * kv_heads + kvh) * capacity + tok0) * D;
        for (int x = tid; x < chunk * VEC; x += DEC_ATTN_THREADS) {
            const int tk = x / VEC, col = x % VEC;
            T* dk = Ks + tk * D + col * 8;
            T* dv = Vs + tk * D + col * 8;
            if (tk < nvalid) {
                dec_cp_async16(dk, kc + base + (long long)tk * D + col * 8);
                dec_cp_async16(dv, vc + base + (long long)tk * D + col * 8);
            } else {  // beyond the sequence: zeros, so that P = 0 times V stays 0
                *reinterpret_cast<uint4*>(dk) = make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(dv) = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        dec_cp_async_wait_all();

        for (int rb0 = 0; rb0 < nrows; rb0 += DEC_ATTN_ROWS) {
            const int nb = min(DEC_ATTN_ROWS, nrows - rb0);
            for (int x = tid; x < nb * D; x += DEC_ATTN_THREADS) {
                const int rr = x / D, e = x % D, r = rowlist[rb0 + rr] / top_k, i = r / group, g = r % group;
                qs[x] = dec_to_float(q[((long long)(b * q_len + i) * heads + kvh * group + g) * D + e]);
            }
            for (int rr = tid; rr < nb; rr += DEC_ATTN_THREADS)
                tl[rr] = len - q_len + (rowlist[rb0 + rr] / top_k) / group;
            __syncthreads();

            // S = scale * log2(e) * q . k, -inf for keys after the row's position. 8 lanes per (row, token).
            {
                const int grp8 = tid >> 3, part = tid & 7;
                for (int p = grp8; p < nb * chunk; p += DEC_ATTN_THREADS / 8) {
                    const int rr = p / chunk, tk = p % chunk;
                    float acc = 0.f;
#pragma unroll
                    for (int m = 0; m < D / 64; ++m) {
                        const int e0 = (m * 8 + part) * 8;
                        float kf[8];
                        dec_unpack8(*reinterpret_cast<const uint4*>(Ks + tk * D + e0), kf, T());
                        const float4 qa = *reinterpret_cast<const float4*>(qs + rr * D + e0);
                        const float4 qb = *reinterpret_cast<const float4*>(qs + rr * D + e0 + 4);
                        acc += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                               qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
                    }
                    acc += __shfl_xor_sync(DEC_FULL, acc, 1);
                    acc += __shfl_xor_sync(DEC_FULL, acc, 2);
                    acc += __shfl_xor_sync(DEC_FULL, acc, 4);
                    if (part == 0)
                        S[rr * DEC_ATTN_CHUNK + tk] = tok0 + tk <= tl[rr] ? acc * scale_log2 : dec_neg_inf();
                }
            }
            __syncthreads();

            // Base-2 softmax pieces per row: m = max, P = 2^(S - m), l = sum P (all -inf: m = -inf, l = 0).
            for (int rr = warp; rr < nb; rr += DEC_ATTN_WARPS) {
                float* srow = S + rr * DEC_ATTN_CHUNK;
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
                    ml[2 * rr] = mx;
                    ml[2 * rr + 1] = l;
                }
            }
            __syncthreads();

            // P.V: thread (tg, ds) sums tokens tg, tg + TG, .. of columns ds * 8 .. + 8, RB rows at a time;
            // lanes of a warp with the same ds are reduced by shuffles, the warps through shared memory.
            {
                const int ds = tid % VEC, tg = tid / VEC;
                float* red = qs;
                for (int rq = 0; rq < nb; rq += DEC_ATTN_RB) {
                    float acc[DEC_ATTN_RB][8];
#pragma unroll
                    for (int x = 0; x < DEC_ATTN_RB; ++x)
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[x][e] = 0.f;
                    for (int tk = tg; tk < chunk; tk += TG) {
                        float vf[8];
                        dec_unpack8(*reinterpret_cast<const uint4*>(Vs + tk * D + ds * 8), vf, T());
#pragma unroll
                        for (int x = 0; x < DEC_ATTN_RB; ++x) {
                            const float pr = rq + x < nb ? S[(rq + x) * DEC_ATTN_CHUNK + tk] : 0.f;
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[x][e] += pr * vf[e];
                        }
                    }
#pragma unroll
                    for (int off = VEC; off < 32; off <<= 1)
#pragma unroll
                        for (int x = 0; x < DEC_ATTN_RB; ++x)
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[x][e] += __shfl_xor_sync(DEC_FULL, acc[x][e], off);
                    if (lane < VEC) {
#pragma unroll
                        for (int x = 0; x < DEC_ATTN_RB; ++x)
#pragma unroll
                            for (int e = 0; e < 8; ++e) red[(warp * DEC_ATTN_RB + x) * D + ds * 8 + e] = acc[x][e];
                    }
                    __syncthreads();
                    for (int x2 = tid; x2 < DEC_ATTN_RB * D; x2 += DEC_ATTN_THREADS) {
                        const int x = x2 / D, e = x2 % D;
                        if (rq + x < nb) {
                            float o = 0.f;
#pragma unroll
                            for (int w = 0; w < DEC_ATTN_WARPS; ++w) o += red[(w * DEC_ATTN_RB + x) * D + e];
                            const int ent = rowlist[rb0 + rq + x], r = ent / top_k, s = ent % top_k;
                            const long long pi = (((long long)(b * kv_heads + kvh) * rows + r) * top_k + s) * n_chunks + c;
                            part_o[pi * D + e] = o;
                            if (e == 0) {
                                part_ml[2 * pi] = ml[2 * (rq + x)];
                                part_ml[2 * pi + 1] = ml[2 * (rq + x) + 1];
                            }
                        }
                    }
                    __syncthreads();
                }
            }
        }
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const unsigned done = atomicAdd(counters + b * kv_heads + kvh, 1u);
        flags[2] = done == gridDim.x - 1;
    }
    __syncthreads();
    if (!flags[2]) return;
    __threadfence();

    // Last CTA of (b, kv head): merge every row's top_k * n_chunks partials.
    constexpr int Q4 = D / 4;
    for (int x = tid; x < rows * Q4; x += DEC_ATTN_THREADS) {
        const int r = x / Q4, d4 = x % Q4, i = r / group, h = kvh * group + r % group;
        const int* srow = sel + ((long long)(b * q_len + i) * heads + h) * top_k;
        const long long p0 = ((long long)(b * kv_heads + kvh) * rows + r) * top_k * n_chunks;
        float mx = dec_neg_inf();
        for (int s = 0; s < top_k; ++s) {
            if (srow[s] < 0) continue;
            for (int c2 = 0; c2 < n_chunks; ++c2) mx = fmaxf(mx, dec_ldcg(part_ml + 2 * (p0 + s * n_chunks + c2)));
        }
        float l = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < top_k; ++s) {
            if (srow[s] < 0) continue;
            for (int c2 = 0; c2 < n_chunks; ++c2) {
                const long long pi = p0 + s * n_chunks + c2;
                const float m = dec_ldcg(part_ml + 2 * pi);
                const float w = m == dec_neg_inf() ? 0.f : exp2f(m - mx);
                l += w * dec_ldcg(part_ml + 2 * pi + 1);
                const float4 po = dec_ldcg(reinterpret_cast<const float4*>(part_o + pi * D) + d4);
                o.x += w * po.x;
                o.y += w * po.y;
                o.z += w * po.z;
                o.w += w * po.w;
            }
        }
        const float inv = 1.f / l;
        const long long oi = ((long long)(b * q_len + i) * heads + h) * D + d4 * 4;
        *reinterpret_cast<uint2*>(out + oi) = make_uint2(dec_pack2(o.x * inv, o.y * inv, T()),
                                                         dec_pack2(o.z * inv, o.w * inv, T()));
        if (d4 == 0) lse[(long long)(b * q_len + i) * heads + h] = (mx + log2f(l)) * 0.69314718055994531f;
    }
    if (tid == 0) counters[b * kv_heads + kvh] = 0u;
}

// ---- entry points (one per dtype x head dim; signatures are parsed by _launch.check_args) ----

extern "C" __global__ void __launch_bounds__(DEC_ROUTE_THREADS, 2)
moba_decode_route_bf16_d64(const __nv_bfloat16* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,
    int* __restrict__ sel, float* __restrict__ part_v, int* __restrict__ part_j, unsigned* __restrict__ counters,
    int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size, int top_k, int n_rg, int rows_per_group,
    int n_split, int blocks_per_split) {
    dec_route_body<__nv_bfloat16, 64>(q, sums, lengths, sel, part_v, part_j, counters, q_len, heads, kv_heads, n_blocks_cap,
                             block_size, top_k, n_rg, rows_per_group, n_split, blocks_per_split);
}

extern "C" __global__ void __launch_bounds__(DEC_ROUTE_THREADS, 2)
moba_decode_route_bf16_d128(const __nv_bfloat16* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,
    int* __restrict__ sel, float* __restrict__ part_v, int* __restrict__ part_j, unsigned* __restrict__ counters,
    int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size, int top_k, int n_rg, int rows_per_group,
    int n_split, int blocks_per_split) {
    dec_route_body<__nv_bfloat16, 128>(q, sums, lengths, sel, part_v, part_j, counters, q_len, heads, kv_heads, n_blocks_cap,
                             block_size, top_k, n_rg, rows_per_group, n_split, blocks_per_split);
}

extern "C" __global__ void __launch_bounds__(DEC_ROUTE_THREADS, 2)
moba_decode_route_fp16_d64(const __half* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,
    int* __restrict__ sel, float* __restrict__ part_v, int* __restrict__ part_j, unsigned* __restrict__ counters,
    int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size, int top_k, int n_rg, int rows_per_group,
    int n_split, int blocks_per_split) {
    dec_route_body<__half, 64>(q, sums, lengths, sel, part_v, part_j, counters, q_len, heads, kv_heads, n_blocks_cap,
                             block_size, top_k, n_rg, rows_per_group, n_split, blocks_per_split);
}

extern "C" __global__ void __launch_bounds__(DEC_ROUTE_THREADS, 2)
moba_decode_route_fp16_d128(const __half* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,
    int* __restrict__ sel, float* __restrict__ part_v, int* __restrict__ part_j, unsigned* __restrict__ counters,
    int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size, int top_k, int n_rg, int rows_per_group,
    int n_split, int blocks_per_split) {
    dec_route_body<__half, 128>(q, sums, lengths, sel, part_v, part_j, counters, q_len, heads, kv_heads, n_blocks_cap,
                             block_size, top_k, n_rg, rows_per_group, n_split, blocks_per_split);
}

extern "C" __global__ void __launch_bounds__(DEC_ATTN_THREADS, 4)
moba_decode_attn_bf16_d64(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const int* __restrict__ lengths, const int* __restrict__ sel, float* __restrict__ part_o,
    float* __restrict__ part_ml, unsigned* __restrict__ counters, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
    int q_len, int heads, int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk,
    float scale_log2) {
    dec_attn_body<__nv_bfloat16, 64>(q, k, v, lengths, sel, part_o, part_ml, counters, out, lse, q_len, heads, kv_heads,
                            capacity, block_size, top_k, n_chunks, chunk, scale_log2);
}

extern "C" __global__ void __launch_bounds__(DEC_ATTN_THREADS, 4)
moba_decode_attn_bf16_d128(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const int* __restrict__ lengths, const int* __restrict__ sel, float* __restrict__ part_o,
    float* __restrict__ part_ml, unsigned* __restrict__ counters, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
    int q_len, int heads, int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk,
    float scale_log2) {
    dec_attn_body<__nv_bfloat16, 128>(q, k, v, lengths, sel, part_o, part_ml, counters, out, lse, q_len, heads, kv_heads,
                            capacity, block_size, top_k, n_chunks, chunk, scale_log2);
}

extern "C" __global__ void __launch_bounds__(DEC_ATTN_THREADS, 4)
moba_decode_attn_fp16_d64(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    const int* __restrict__ lengths, const int* __restrict__ sel, float* __restrict__ part_o,
    float* __restrict__ part_ml, unsigned* __restrict__ counters, __half* __restrict__ out, float* __restrict__ lse,
    int q_len, int heads, int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk,
    float scale_log2) {
    dec_attn_body<__half, 64>(q, k, v, lengths, sel, part_o, part_ml, counters, out, lse, q_len, heads, kv_heads,
                            capacity, block_size, top_k, n_chunks, chunk, scale_log2);
}

extern "C" __global__ void __launch_bounds__(DEC_ATTN_THREADS, 4)
moba_decode_attn_fp16_d128(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    const int* __restrict__ lengths, const int* __restrict__ sel, float* __restrict__ part_o,
    float* __restrict__ part_ml, unsigned* __restrict__ counters, __half* __restrict__ out, float* __restrict__ lse,
    int q_len, int heads, int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk,
    float scale_log2) {
    dec_attn_body<__half, 128>(q, k, v, lengths, sel, part_o, part_ml, counters, out, lse, q_len, heads, kv_heads,
                            capacity, block_size, top_k, n_chunks, chunk, scale_log2);
}
