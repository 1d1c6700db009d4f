// Device helpers shared by the two decode kernels, decode.cu (one persistent launch) and decode_split.cu
// (a score and a select launch for the routing, then an attention launch): 16-bit element conversion and packing,
// the 16-byte copies and loads (cp.async.cg, ld.global.cg, ld.global.nc), tensor-map bulk copies on mbarriers,
// NaN / -inf helpers and the dynamic shared memory.
//
// Host emulation (tests): under DEC_HOST_EMULATION the CUDA headers, the cp.async / bulk copy / ld.cg helpers and
// the dynamic shared-memory declaration come from the host harness (tests/kernels/host_emulation/cuda_host.h,
// which models them under these names); the streaming load becomes a plain load.
#ifndef MOBALAB_DECODE_COMMON_CUH
#define MOBALAB_DECODE_COMMON_CUH

#ifndef DEC_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mbarrier.cuh"
#endif

#define DEC_FULL 0xffffffffu

#ifndef DEC_DYNAMIC_SMEM
#define DEC_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- 16-bit element types ----

__device__ __forceinline__ float dec_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float dec_to_float(__half x) { return __half2float(x); }

// Two packed elements (low half first) -> two floats (bf16 is the top half of an fp32: exact shifts).
__device__ __forceinline__ void dec_unpack2(unsigned w, float& a, float& b, __nv_bfloat16) {
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void dec_unpack2(unsigned w, float& a, float& b, __half) {
    a = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    b = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}

// One 16-byte vector of 8 elements -> 8 floats.
template <typename T>
__device__ __forceinline__ void dec_unpack8(const uint4& u, float (&f)[8]) {
    dec_unpack2(u.x, f[0], f[1], T());
    dec_unpack2(u.y, f[2], f[3], T());
    dec_unpack2(u.z, f[4], f[5], T());
    dec_unpack2(u.w, f[6], f[7], T());
}

// CPL consecutive elements at p (CPL = 4: 8 bytes, CPL = 2: 4 bytes) -> floats.
template <typename T, int CPL>
__device__ __forceinline__ void dec_load_cols(const T* p, float (&f)[CPL]) {
    static_assert(CPL == 2 || CPL == 4, "d / 32 columns per lane");
    if constexpr (CPL == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        dec_unpack2(u.x, f[0], f[1], T());
        dec_unpack2(u.y, f[CPL - 2], f[CPL - 1], T());
    } else {
        dec_unpack2(*reinterpret_cast<const unsigned*>(p), f[0], f[CPL - 1], T());
    }
}

__device__ __forceinline__ unsigned dec_pack2(float a, float b, __nv_bfloat16) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(a)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(b)) << 16);
}
__device__ __forceinline__ unsigned dec_pack2(float a, float b, __half) {
    return (unsigned)__half_as_ushort(__float2half_rn(a)) | ((unsigned)__half_as_ushort(__float2half_rn(b)) << 16);
}

// ---- 16-byte copies and loads ----

#ifndef DEC_HOST_EMULATION
// 16-byte global -> shared copy that bypasses L1 (the data is read once).
__device__ __forceinline__ void dec_cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void dec_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are in flight (a __syncthreads must follow before
// other threads read the data).
template <int N>
__device__ __forceinline__ void dec_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// The same for a run-time n in 0 .. 6 (the instruction takes an immediate; larger n wait as for 6).
__device__ __forceinline__ void dec_cp_async_wait_n(int n) {
    switch (n) {
        case 0: dec_cp_async_wait<0>(); break;
        case 1: dec_cp_async_wait<1>(); break;
        case 2: dec_cp_async_wait<2>(); break;
        case 3: dec_cp_async_wait<3>(); break;
        case 4: dec_cp_async_wait<4>(); break;
        case 5: dec_cp_async_wait<5>(); break;
        default: dec_cp_async_wait<6>(); break;
    }
}
// Loads of what other CTAs of this grid wrote (after a completion counter or a wait): from L2, never a stale
// L1 line.
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
__device__ __forceinline__ float2 dec_ldcg(const float2* p) {
    float2 v;
    asm volatile("ld.global.cg.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "l"(p) : "memory");
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
// Data that is read-only for the whole launch and read once (block sums): the non-coherent path, no L1
// allocation.
__device__ __forceinline__ float4 dec_ld_stream(const float4* p) {
    float4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 dec_ld_stream(const uint2* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// ---- tensor-map bulk copies on mbarriers (sm_90; PTX ISA "cp.async.bulk.tensor", "mbarrier") ----
// A tensor map (the driver's cuTensorMapEncodeTiled, passed by value as a __grid_constant__ kernel parameter)
// describes a 2-D global tensor and a box; one cp.async.bulk.tensor copies a whole box into shared memory through
// the copy engine, without the issuing thread's load path, with the 128-byte swizzle (16-byte chunk c of box row r
// lands at c ^ (r & 7), the destination 1 KB-aligned), and counts its bytes off an mbarrier's transaction count. A
// phase of the barrier completes when its arrivals (the init count) have arrived and the bytes they announced
// (arrive.expect_tx) have landed; a thread whose wait sees the phase complete also sees the copies' data. The
// mbarrier operations are mbarrier.cuh's; these names are the ones the host emulation models.
struct __align__(64) moba_tensor_map {
    unsigned long long opaque[16];
};
// Expected arrivals `count`, phase 0; a CTA-wide barrier must follow before another thread uses it.
__device__ __forceinline__ void dec_mbar_init(unsigned long long* bar, unsigned count) {
    moba::mbar_init(moba::smem_u32(bar), count);
}
__device__ __forceinline__ void dec_mbar_arrive_tx(unsigned long long* bar, unsigned bytes) {
    moba::mbar_arrive_expect_tx(moba::smem_u32(bar), bytes);
}
// The box at (column c0, row c1) of the tensor `map` describes into `smem`, its bytes counted on `bar`.
__device__ __forceinline__ void dec_tma_load_2d(void* smem, const moba_tensor_map* map, int c0, int c1,
                                                unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(moba::smem_u32(smem)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(moba::smem_u32(bar))
        : "memory");
}
// Block until the phase of parity `parity` of `bar` has completed (acquire; traps after ~10 s).
__device__ __forceinline__ void dec_mbar_wait(unsigned long long* bar, unsigned parity) {
    moba::mbar_wait(moba::smem_u32(bar), parity);
}
// Orders this thread's earlier generic-proxy accesses of shared memory before later bulk copies into it.
__device__ __forceinline__ void dec_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#else
inline float4 dec_ld_stream(const float4* p) { return *p; }
inline uint2 dec_ld_stream(const uint2* p) { return *p; }
#endif

// ---- programmatic dependent launch ----
// A kernel launched with programmatic stream serialization (_launch.py, Launch.dependent) may start while the
// previous kernel on its stream still runs, once every CTA of that kernel has run dec_grid_launch_dependents (or
// exited): dec_grid_wait then blocks until the previous grid has completed and its writes are visible. Both are
// no-ops for an ordinary launch, before sm_90 and in the host emulation (which runs launches one after another).
#if !defined(DEC_HOST_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void dec_grid_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void dec_grid_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::); }
#else
__device__ __forceinline__ void dec_grid_wait() {}
__device__ __forceinline__ void dec_grid_launch_dependents() {}
#endif

// ---- the completion ticket ----
// Every thread's stores, a CTA barrier, one thread's ticket as an acquire-release atomic (atom.add.acq_rel.gpu);
// the last CTA's barrier after it, then every thread's loads of the others' stores: the semaphore pattern, the
// barriers carrying the CTA's stores to the one thread's release and its acquire to the CTA's loads. (Measured on an
// H200 in the decode attention launch against every thread's fence.acq_rel.gpu before the ticket and the last CTA's
// after it, two interleaved runs at nine points: 0.2-0.7 us shorter a step at six or seven points of each run,
// equal at 512K, at 32K batch 64 equal in one run and 0.4 us longer in the other; those fences
// against __threadfence(), fence.sc.gpu: equal within 0.3 us and steadier. RESULTS.md.)
#ifndef DEC_HOST_EMULATION
__device__ __forceinline__ unsigned dec_ticket_acq_rel(unsigned* p) {
    unsigned old;
    asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;\n" : "=r"(old) : "l"(p) : "memory");
    return old;
}
#else
inline unsigned dec_ticket_acq_rel(unsigned* p) { return atomicAdd(p, 1u); }
#endif

// ---- release counters ----
// One thread adds 1 with release semantics after a CTA barrier (the barrier carries the CTA's stores to it); a
// waiting CTA's thread 0 reads the counter with acquire semantics until it reaches the number of releases it waits
// for, then a CTA barrier carries that acquire to the CTA's loads, which read from L2 (dec_ldcg), never a stale L1
// line. (The host emulation has its own models of the wait and of the acquire load.)
#define DEC_SPIN_LIMIT (1u << 24)  // polls (>= 100 ns apart) before a wait gives up with a trap
#ifndef DEC_HOST_EMULATION
__device__ __forceinline__ void dec_release_add(unsigned* p) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(p) : "memory");
}
__device__ __forceinline__ unsigned dec_ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Thread 0 of a CTA: wait until *p >= target (p is raised by releases or by atomics after a fence of other CTAs).
__device__ __forceinline__ void dec_wait_at_least(const unsigned* p, unsigned target) {
    unsigned polls = 0;
    while (dec_ld_acquire(p) < target) {
        if (++polls == DEC_SPIN_LIMIT) __trap();  // a broken dependency fails loudly instead of hanging
        __nanosleep(100);
    }
}
#else
inline void dec_release_add(unsigned* p) { atomicAdd(p, 1u); }
#endif

// ---- small helpers ----

// A compile-time row count passed to a generic lambda (decltype(n)::value).
template <int N>
struct dec_int {
    static constexpr int value = N;
};

__device__ __forceinline__ float dec_nan() { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ float dec_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ bool dec_isnan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
// z where the four values are finite, NaN where one is not (x * 0 is NaN exactly for an infinite or NaN x; fast
// math keeps it): added into a block's score, it makes the score of a block whose sum is not finite NaN, which no
// selection takes, as the prefill's router does with such a block's centroid (whatever sign q gives the product).
__device__ __forceinline__ float dec_poison_nonfinite(const float4& v, float z) {
    return fmaf(v.x, 0.f, fmaf(v.y, 0.f, fmaf(v.z, 0.f, fmaf(v.w, 0.f, z))));
}
__host__ __device__ __forceinline__ int dec_align16(int x) { return (x + 15) & ~15; }

// ---- the centroid a router of centroid_precision "input" scores ----
// Built with MOBA_DECODE_CENTROIDS_INPUT=1, the score passes rank the candidates by q . T(S_j / B), the block mean
// rounded to the cache's type T, as the prefill's router of that precision does (its centroid pass rounds the fp32
// mean), instead of q . S_j. decode_split.cu reads those means from the cache's 16-bit copy; decode.cu rounds the
// fp32 sums with the helpers below. B is a power of two (the kernels' block sizes), so S_j * 2^-log2(B) is the IEEE
// quotient S_j / B exactly: no division per element.
#ifndef MOBA_DECODE_CENTROIDS_INPUT
#define MOBA_DECODE_CENTROIDS_INPUT 0
#endif

// 1 / b for a power of two b, exact: the float whose exponent field is 127 - log2(b).
__device__ __forceinline__ float dec_inv_pow2(int b) { return __int_as_float((127 - (__ffs(b) - 1)) << 23); }
__device__ __forceinline__ float dec_round_to(float x, __nv_bfloat16) {
    return __bfloat162float(__float2bfloat16_rn(x));
}
__device__ __forceinline__ float dec_round_to(float x, __half) { return __half2float(__float2half_rn(x)); }
// T(S / B) of the four elements of a block-sum vector, back in fp32 (T holds them exactly).
template <typename T>
__device__ __forceinline__ float4 dec_input_centroid(float4 s, float inv_b) {
    return make_float4(dec_round_to(s.x * inv_b, T()), dec_round_to(s.y * inv_b, T()),
                       dec_round_to(s.z * inv_b, T()), dec_round_to(s.w * inv_b, T()));
}

// ---- one attention chunk ----

// Tokens 0 .. chunk - 1 of K and V from element offset src into ks / vs ([chunk][D] each) as 16-byte
// cp.async copies (THREADS threads, thread tid); tokens from nvalid on are zero-filled, so that P = 0 times V
// stays 0 beyond the sequence. The caller commits the group.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void dec_issue_kv_chunk(T* ks, T* vs, const T* k, const T* v, long long src, int chunk,
                                                   int nvalid, int tid) {
    constexpr int VEC = D / 8;  // 16-byte vectors per K/V row
    for (int y = tid; y < chunk * VEC; y += THREADS) {
        const int tk = y / VEC, off = tk * D + (y - tk * VEC) * 8;
        if (tk < nvalid) {
            dec_cp_async16(ks + off, k + src + off);
            dec_cp_async16(vs + off, v + src + off);
        } else {
            *reinterpret_cast<uint4*>(ks + off) = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(vs + off) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// S[rr * CH + tk] = scale_log2 * q_rr . k_tk for the nb query rows in qs ([nb][D] fp32) and the chunk's keys in ks
// ([chunk][D]), -inf for keys after the row's position tl[rr] (key tk sits at tok0 + tk). 8 lanes per (row,
// token), each over 8-element parts part, part + 8, ..., summed across the 8 lanes; nb * chunk is a multiple of
// 16, so the 4 groups of a warp run the same iterations (THREADS threads, thread tid).
template <typename T, int D, int CH, int THREADS>
__device__ __forceinline__ void dec_chunk_scores(float* S, const float* qs, const T* ks, const int* tl, int nb,
                                                 int chunk, int tok0, float scale_log2, int tid) {
    const int grp8 = tid >> 3, part = tid & 7;
    for (int pp = grp8; pp < nb * chunk; pp += THREADS / 8) {
        const int rr = pp / chunk, tk = pp - rr * chunk;
        float acc = 0.f;
#pragma unroll
        for (int m = 0; m < D / 64; ++m) {
            const int e0 = (m * 8 + part) * 8;
            const uint4 u = *reinterpret_cast<const uint4*>(ks + tk * D + e0);  // one 16-byte shared load
            float kf[8];
            dec_unpack8<T>(u, kf);
            const float4 qa = *reinterpret_cast<const float4*>(qs + rr * D + e0);
            const float4 qb = *reinterpret_cast<const float4*>(qs + rr * D + e0 + 4);
            acc += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                   qb.z * kf[6] + qb.w * kf[7];
        }
        acc += __shfl_xor_sync(DEC_FULL, acc, 1);
        acc += __shfl_xor_sync(DEC_FULL, acc, 2);
        acc += __shfl_xor_sync(DEC_FULL, acc, 4);
        if (part == 0) S[rr * CH + tk] = tok0 + tk <= tl[rr] ? acc * scale_log2 : dec_neg_inf();
    }
}

// Base-2 softmax pieces of one row of n scores, by one warp, in place: mx = max (-inf if every score is),
// srow[tk] = P = 2^(s - mx) (0 when mx = -inf), l = sum P; mx and l on every lane.
__device__ __forceinline__ void dec_row_softmax2(float* srow, int n, int lane, float& mx, float& l) {
    mx = dec_neg_inf();
    for (int tk = lane; tk < n; tk += 32) mx = fmaxf(mx, srow[tk]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, off));
    l = 0.f;
    for (int tk = lane; tk < n; tk += 32) {
        const float pr = mx == dec_neg_inf() ? 0.f : exp2f(srow[tk] - mx);
        srow[tk] = pr;
        l += pr;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(DEC_FULL, l, off);
}

#endif  // MOBALAB_DECODE_COMMON_CUH
