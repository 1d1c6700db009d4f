// MoBA routing stage 1: block centroids (mean-pool of the keys per block), fp32 accumulation.
//
//   centroid[b, j, g, :] = (1 / |j|) * sum_{i = jB}^{min((j+1)B, N) - 1} k[b, i, g, :]
//
// |j| is the real length of block j, so a partial last block averages only the keys it holds.
// Optionally the fp32 centroid is also split into two values of the input type, hi = T(c) and
// lo = T(c - hi), written to (b, kv_heads, n, d) buffers: the top-k kernel multiplies q by both on tensor
// cores, which recovers ~16 mantissa bits of the fp32 centroid (a single bf16 centroid would flip many
// near-ties against the fp32 reference).
//
// Layouts: k (b, N, kv_heads, D) contiguous; centroids (b, n, kv_heads, D) fp32; hi/lo (b, kv_heads, n, D).
// Grid (n, kv_heads, b), 128 threads: D/8 threads share a key row (16-byte loads), the other threads take
// other rows of the block; partial sums are reduced through shared memory. At D = 96 a row takes 12 threads:
// 10 row groups use 120 threads and the last 8 idle (a bandwidth-bound kernel with many CTAs per SM).
#include "ptx.cuh"

using moba::Elem;

#define CENTROID_THREADS 128

// An element whose hi is not finite makes both halves NaN: the block then scores NaN in either precision (q . hi
// alone, the "input" precision's score, would be +-inf, and +inf is selected first), so it is never selected, as
// the reference drops a block whose centroid is not finite.
template <typename T>
__device__ __forceinline__ void centroid_write_split(float c, T* hi, T* lo, long long idx) {
    const T h = Elem<T>::from_float(c);
    const float hf = Elem<T>::to_float(h);
    const bool finite = (__float_as_uint(hf) & 0x7f800000u) != 0x7f800000u;
    const T nan = Elem<T>::from_float(moba::quiet_nan());
    hi[idx] = finite ? h : nan;
    lo[idx] = finite ? Elem<T>::from_float(c - hf) : nan;
}

template <typename T, int D>
__device__ __forceinline__ void centroid_body(const T* __restrict__ k, float* __restrict__ cent,
                                              T* __restrict__ hi, T* __restrict__ lo, int seqlen,
                                              int n_blocks, int kv_heads, int block_size) {
    constexpr int LANES_PER_ROW = D / 8;
    constexpr int ROW_GROUPS = CENTROID_THREADS / LANES_PER_ROW;
    __shared__ float partial[ROW_GROUPS][D];

    const int j = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const int rg = tid / LANES_PER_ROW, lane = tid % LANES_PER_ROW;
    // Threads past the last whole row group (D = 96 only) add nothing.
    const bool in_group = CENTROID_THREADS % LANES_PER_ROW == 0 || rg < ROW_GROUPS;
    const int start = j * block_size;
    const int len = min(block_size, seqlen - start);

    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;

    const long long row_stride = (long long)kv_heads * D;
    const T* base = k + (((long long)b * seqlen + start) * kv_heads + g) * D + lane * 8;
#pragma unroll 4
    for (int r = in_group ? rg : len; r < len; r += ROW_GROUPS) {
        const uint4 raw = *reinterpret_cast<const uint4*>(base + r * row_stride);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += Elem<T>::to_float(v[e]);
    }
    if (in_group) {
#pragma unroll
        for (int e = 0; e < 8; ++e) partial[rg][lane * 8 + e] = acc[e];
    }
    __syncthreads();

    for (int c = tid; c < D; c += CENTROID_THREADS) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < ROW_GROUPS; ++q) s += partial[q][c];
        // IEEE division: --use_fast_math would otherwise turn '/' into an approximate reciprocal.
        const float mean = __fdiv_rn(s, (float)len);
        cent[(((long long)b * n_blocks + j) * kv_heads + g) * D + c] = mean;
        if (hi != nullptr) {
            centroid_write_split<T>(mean, hi, lo, (((long long)b * kv_heads + g) * n_blocks + j) * D + c);
        }
    }
}

// Split given fp32 centroids (b, n, kv_heads, dim) into hi/lo (b, kv_heads, n, dim).
// Grid (n, kv_heads, b), any block size.
template <typename T>
__device__ __forceinline__ void split_body(const float* __restrict__ cent, T* __restrict__ hi,
                                           T* __restrict__ lo, int n_blocks, int kv_heads, int dim) {
    const int j = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float x = cent[(((long long)b * n_blocks + j) * kv_heads + g) * dim + c];
        centroid_write_split<T>(x, hi, lo, (((long long)b * kv_heads + g) * n_blocks + j) * dim + c);
    }
}

// ---- entry points: one definition per kind with a literal parameter list, exported under the names of the
// instantiation lines (mobalab.kernels._launch reads both to check launch arguments), grouped by head dim
// under MOBA_HAS_HEAD_DIM (ptx.cuh: -DMOBA_HEAD_DIM=d builds head dim d only) ----

#define MOBA_CENTROIDS_KERNEL(NAME, T, D)                                                                             \
    extern "C" __global__ void __launch_bounds__(CENTROID_THREADS)                                                    \
    NAME(const T* __restrict__ k, float* __restrict__ cent, T* __restrict__ hi, T* __restrict__ lo, int seqlen,       \
         int n_blocks, int kv_heads, int block_size) {                                                                \
        centroid_body<T, D>(k, cent, hi, lo, seqlen, n_blocks, kv_heads, block_size);                                 \
    }

#if MOBA_HAS_HEAD_DIM(32)
MOBA_CENTROIDS_KERNEL(moba_centroids_bf16_d32,  __nv_bfloat16, 32)
MOBA_CENTROIDS_KERNEL(moba_centroids_fp16_d32,  __half,        32)
#endif
#if MOBA_HAS_HEAD_DIM(64)
MOBA_CENTROIDS_KERNEL(moba_centroids_bf16_d64,  __nv_bfloat16, 64)
MOBA_CENTROIDS_KERNEL(moba_centroids_fp16_d64,  __half,        64)
#endif
#if MOBA_HAS_HEAD_DIM(96)
MOBA_CENTROIDS_KERNEL(moba_centroids_bf16_d96,  __nv_bfloat16, 96)
MOBA_CENTROIDS_KERNEL(moba_centroids_fp16_d96,  __half,        96)
#endif
#if MOBA_HAS_HEAD_DIM(128)
MOBA_CENTROIDS_KERNEL(moba_centroids_bf16_d128, __nv_bfloat16, 128)
MOBA_CENTROIDS_KERNEL(moba_centroids_fp16_d128, __half,        128)
#endif
#if MOBA_HAS_HEAD_DIM(256)
MOBA_CENTROIDS_KERNEL(moba_centroids_bf16_d256, __nv_bfloat16, 256)
MOBA_CENTROIDS_KERNEL(moba_centroids_fp16_d256, __half,        256)
#endif

#define MOBA_SPLIT_CENTROIDS_KERNEL(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const float* __restrict__ cent, T* __restrict__ hi, T* __restrict__ lo,           \
                                    int n_blocks, int kv_heads, int dim) {                                            \
        split_body<T>(cent, hi, lo, n_blocks, kv_heads, dim);                                                         \
    }

MOBA_SPLIT_CENTROIDS_KERNEL(moba_split_centroids_bf16,  __nv_bfloat16)
MOBA_SPLIT_CENTROIDS_KERNEL(moba_split_centroids_fp16,  __half)
