// Timing probes of what a warpgroup can do while its own warpgroup MMAs run (sm_90a; scripts/wgmma_overlap.py).
// Not a MoBA kernel: it measures, with clock64 per warp, the two effects that decide how a kernel may overlap its
// scalar work with wgmma (the wgmma top-k router scans scores under the next chunk's MMA).
//
// overlap_ss (blockDim 128 or 256: one or two warpgroups, every warpgroup alike): `iters` rounds of issue 16
//   wgmma m64n128k16 (two m64 accumulators x 8 k-steps, A and B from shared memory, the router's chunk) -> work
//   -> wgmma.wait_group 0, timing the issue, the work and the wait. Work `mode`:
//   0 none; 1 n_work rounds of 4 dependent FFMA chains (registers only); 2 n_work passes of 16 LDS.128 over the
//   thread's own 256-byte row of a 64 KB tile (the row scan of a score tile); 3 the same with the row stored first.
//   `mma` = 0 runs the work alone. So: how long a warpgroup is held by issuing its wgmmas, and how much slower
//   its scalar and shared-memory work runs while they are in flight.
// pingpong_1 / pingpong_2 (blockDim 128 x warpgroups): each warpgroup loops {issue 8 (pingpong_1: one m64) or 16
//   (pingpong_2: two m64) wgmma -> wait -> n_work rounds of FFMA fed by the accumulators}, no barriers between
//   warpgroups: how much register-only work per round the tensor pipe hides when warpgroups take turns.
#include <cuda_bf16.h>

#include "ptx.cuh"
#include "wgmma.cuh"

#if MOBA_HAS_WGMMA
using namespace moba;

namespace {

__device__ __forceinline__ long long probe_clock() {
  long long c;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(c)::"memory");
  return c;
}

// Non-zero bf16 values (about 1) into `bytes` of shared memory from s0 (the MMA operands; values do not matter
// for timing, but a tensor core fed zeros could take a shortcut).
__device__ __forceinline__ void probe_fill(unsigned s0, unsigned bytes) {
  for (unsigned o = threadIdx.x * 16; o < bytes; o += blockDim.x * 16) {
    const unsigned v = 0x3c003c00u ^ (o * 2654435761u & 0x007f007fu);
    asm volatile("st.shared.v4.b32 [%0], {%1,%1,%1,%1};" ::"r"(s0 + o), "r"(v) : "memory");
  }
  fence_proxy_async_shared();
  __syncthreads();
}

constexpr unsigned kQTile = sw128_tile_bytes(64, 128);   // one m64 x 128 A tile, 16 KB
constexpr unsigned kBTile = sw128_tile_bytes(128, 128);  // the 128 x 128 B tile, 32 KB

// The dynamic shared memory's first 1024-byte aligned address (the swizzle patterns' alignment; the launch adds
// 1 KB of slack).
__device__ __forceinline__ unsigned probe_base() {
  extern __shared__ __align__(1024) unsigned char smem[];
  return (static_cast<unsigned>(__cvta_generic_to_shared(smem)) + 1023) & ~1023u;
}

// One commit group of H x 8 wgmma m64n128k16: acc[h] = A tile h (at sq_wg + h kQTile) x B^T, 8 k-steps.
template <int H>
__device__ __forceinline__ void probe_issue(float (&acc)[H][64], unsigned sq_wg, unsigned sb) {
#pragma unroll
  for (int h = 0; h < H; ++h) wgmma_fence_operand(acc[h]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 8; ++ks)
#pragma unroll
    for (int h = 0; h < H; ++h)
      wgmma_ss<__nv_bfloat16>(acc[h], wgmma_desc_sw128(sq_wg + h * kQTile, ks, 64), wgmma_desc_sw128(sb, ks, 128),
                              ks > 0);
  wgmma_commit_group();
}

__device__ __forceinline__ void overlap_body(int mode, int mma, int iters, int n_work, long long* out, float* sink) {
  const unsigned s0 = probe_base();
  const unsigned sq = s0, sb = s0 + 4 * kQTile, ss = sb + kBTile;  // 4 A tiles, the B tile, a 64 KB score tile
  probe_fill(s0, 4 * kQTile + kBTile + 256 * 256);
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const unsigned sq_wg = sq + wg * 2 * kQTile;
  float acc[2][64];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[h][i] = 0.f;
  float x0 = tid, x1 = tid + 1, x2 = tid + 2, x3 = tid + 3;
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
  long long d_issue = 0, d_work = 0, d_wait = 0;
  const unsigned srow = ss + tid * 256;
  const long long start = probe_clock();
  for (int it = 0; it < iters; ++it) {
    const long long t0 = probe_clock();
    if (mma) probe_issue(acc, sq_wg, sb);
    const long long t1 = probe_clock();
    if (mode == 1) {
      for (int r = 0; r < n_work; ++r) {
        x0 = fmaf(x0, 0.999f, 0.5f);
        x1 = fmaf(x1, 0.999f, 0.5f);
        x2 = fmaf(x2, 0.999f, 0.5f);
        x3 = fmaf(x3, 0.999f, 0.5f);
      }
    } else if (mode >= 2) {
      for (int r = 0; r < n_work; ++r) {
        if (mode == 3) {
#pragma unroll
          for (int w = 0; w < 16; ++w)
            asm volatile("st.shared.v4.f32 [%0], {%1,%2,%3,%4};" ::"r"(srow + ((w ^ (tid & 7)) << 4)), "f"(x0),
                         "f"(x1), "f"(x2), "f"(x3)
                         : "memory");
        }
#pragma unroll
        for (int w = 0; w < 16; ++w) {
          const float4 v = ld_shared_v4_f32(srow + ((w ^ (tid & 7)) << 4));
          sum.x += v.x;
          sum.y += v.y;
          sum.z += v.z;
          sum.w += v.w;
        }
      }
    }
    const long long t2 = probe_clock();
    if (mma) {
      wgmma_wait_group<0>();
      wgmma_fence_operand(acc[0]);
      wgmma_fence_operand(acc[1]);
    }
    const long long t3 = probe_clock();
    d_issue += t1 - t0;
    d_work += t2 - t1;
    d_wait += t3 - t2;
  }
  const long long total = probe_clock() - start;
  float s = x0 + x1 + x2 + x3 + sum.x + sum.y + sum.z + sum.w;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) s += acc[h][i];
  sink[blockIdx.x * blockDim.x + tid] = s;
  if (lane == 0 && blockIdx.x == 0) {
    long long* o = out + (tid >> 5) * 4;
    o[0] = d_issue;
    o[1] = d_work;
    o[2] = d_wait;
    o[3] = total;
  }
}

template <int H>
__device__ __forceinline__ void pingpong_body(int iters, int n_work, long long* out, float* sink) {
  const unsigned s0 = probe_base();
  const unsigned sb = s0 + 8 * kQTile;  // room for 8 A tiles (four warpgroups x two m64), then the B tile
  probe_fill(s0, 8 * kQTile + kBTile);
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const unsigned sq_wg = s0 + wg * 2 * kQTile;
  float acc[H][64];
  float x0 = tid, x1 = tid + 1, x2 = tid + 2, x3 = tid + 3;
  long long d_mma = 0;
  const long long start = probe_clock();
  for (int it = 0; it < iters; ++it) {
    const long long t0 = probe_clock();
    probe_issue(acc, sq_wg, sb);
    wgmma_wait_group<0>();
#pragma unroll
    for (int h = 0; h < H; ++h) wgmma_fence_operand(acc[h]);
    d_mma += probe_clock() - t0;
    for (int r = 0; r < n_work; ++r) {
#pragma unroll
      for (int h = 0; h < H; ++h)
#pragma unroll
        for (int i = 0; i < 64; i += 4) {
          x0 = fmaf(x0, 0.999f, acc[h][i]);
          x1 = fmaf(x1, 0.999f, acc[h][i + 1]);
          x2 = fmaf(x2, 0.999f, acc[h][i + 2]);
          x3 = fmaf(x3, 0.999f, acc[h][i + 3]);
        }
    }
  }
  const long long total = probe_clock() - start;
  sink[blockIdx.x * blockDim.x + tid] = x0 + x1 + x2 + x3;
  if (lane == 0 && blockIdx.x == 0) {
    out[(tid >> 5) * 2] = total;
    out[(tid >> 5) * 2 + 1] = d_mma;
  }
}

}  // namespace
#endif

#if MOBA_HAS_WGMMA
#define PROBE_BODY(...) __VA_ARGS__
#else
#define PROBE_BODY(...) __trap()
#endif

extern "C" __global__ void __launch_bounds__(256, 1)
    overlap_ss(int mode, int mma, int iters, int n_work, long long* out, float* sink) {
  PROBE_BODY(overlap_body(mode, mma, iters, n_work, out, sink));
}
extern "C" __global__ void __launch_bounds__(512, 1) pingpong_1(int iters, int n_work, long long* out, float* sink) {
  PROBE_BODY(pingpong_body<1>(iters, n_work, out, sink));
}
extern "C" __global__ void __launch_bounds__(256, 1) pingpong_2(int iters, int n_work, long long* out, float* sink) {
  PROBE_BODY(pingpong_body<2>(iters, n_work, out, sink));
}
