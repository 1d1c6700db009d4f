// Hardware probe of the Hopper helpers in wgmma.cuh: one warpgroup (128 threads) computes
//   D (64 x N, fp32) = A (64 x K) * B^T,   B given as N x K (K contiguous, as the keys are for S = Q K^T),
// with K = 16 ks (ks <= 8), N in {64, 128}, bf16 or fp16 inputs, and writes D row-major with the
// accumulator mapping wgmma_acc_row / wgmma_acc_col. A and B are copied from global memory into shared
// memory in the 128-byte-swizzled K-major layout (sw128_offset) and read by wgmma through descriptors
// (wgmma_desc_sw128), one wgmma per k-step. The "reg" variants give A from registers instead: each thread
// loads the A elements that a 64 x K fp32 accumulator would hold (the mapping again) and packs them with
// wgmma_pack_a, the path P = softmax(S) takes into P.V. The accumulator starts as NaN and the first k-step
// runs with scale-d = 0, so it must be overwritten, not added to.
// The "regmn" variants give B as K x N (N contiguous: D = A B, the shape of V in O = P V) and stage it
// MN-major (sw128_offset(k, n, K): K is the row) for wgmma with imm-trans-b = 1 and the descriptor of
// wgmma_desc_sw128_mn; A from registers as in "reg".
// Not a MoBA kernel: tests/kernels/test_wgmma_probe_gpu.py compares it with torch (see docs/design.md,
// "Hopper path").
#include "wgmma.cuh"

namespace moba {

constexpr int WGMMA_PROBE_THREADS = 128;
constexpr int WGMMA_PROBE_MAX_KSTEPS = 8;

// rows x cols elements, row-major, from global -> the swizzled tile at shared address `tile`, in 16-byte
// chunks (8 elements, which sw128_offset keeps contiguous).
template <typename T>
__device__ __forceinline__ void wgmma_probe_stage(unsigned tile, const T* src, int rows, int cols) {
  const int chunks_per_row = cols / 8;
  for (int c = threadIdx.x; c < rows * chunks_per_row; c += WGMMA_PROBE_THREADS) {
    const int r = c / chunks_per_row, k = (c % chunks_per_row) * 8;
    const uint4 v = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(r) * cols + k);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(tile + sw128_offset(r, k, rows)), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  }
}

template <typename T, int N, bool A_IN_REGISTERS, bool B_MN_MAJOR>
__device__ __forceinline__ void wgmma_probe(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ d,
                                            int ks) {
#if MOBA_HAS_WGMMA
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) + SW128_PATTERN_BYTES - 1) &
                        ~(SW128_PATTERN_BYTES - 1);
  const unsigned tile_a = base, tile_b = base + sw128_tile_bytes(64, 16 * ks);
  unsigned dynamic_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dynamic_bytes));
  // the launch must bring the 1024-byte alignment slack and both tiles (_cuda_wgmma_probe.shared_bytes)
  const unsigned b_bytes = B_MN_MAJOR ? sw128_tile_bytes(16 * ks, N) : sw128_tile_bytes(N, 16 * ks);
  if (ks < 1 || ks > WGMMA_PROBE_MAX_KSTEPS ||
      dynamic_bytes < SW128_PATTERN_BYTES + sw128_tile_bytes(64, 16 * ks) + b_bytes)
    __trap();
  const int t = threadIdx.x;
  if (!A_IN_REGISTERS) wgmma_probe_stage(tile_a, a, 64, 16 * ks);
  if (B_MN_MAJOR)
    wgmma_probe_stage(tile_b, b, 16 * ks, N);  // K x N: row k, the 128-byte rows along N
  else
    wgmma_probe_stage(tile_b, b, N, 16 * ks);
  fence_proxy_async_shared();
  __syncthreads();

  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = __int_as_float(0x7fc00000);  // NaN: scale-d = 0 must drop it
  wgmma_fence_operand(acc);
  for (int s = 0; s < ks; ++s) {
    wgmma_fence();  // the accumulator (and the A registers) were written by ordinary instructions
    if (A_IN_REGISTERS) {
      float p[8];
#pragma unroll
      for (int i = 0; i < 8; ++i)  // the A values a 64 x K accumulator would hold in floats 8s .. 8s+7
        p[i] = static_cast<float>(a[wgmma_acc_row(t, 8 * s + i) * 16 * ks + wgmma_acc_col(t, 8 * s + i)]);
      unsigned frag[4];
      wgmma_pack_a<T>(p, frag);
      if (B_MN_MAJOR)
        wgmma_rs<T, 1>(acc, frag, wgmma_desc_sw128_mn(tile_b, s, 16 * ks, N), s > 0);
      else
        wgmma_rs<T>(acc, frag, wgmma_desc_sw128(tile_b, s, N), s > 0);
    } else {
      wgmma_ss<T>(acc, wgmma_desc_sw128(tile_a, s, 64), wgmma_desc_sw128(tile_b, s, N), s > 0);
    }
    wgmma_commit_group();
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[wgmma_acc_row(t, i) * N + wgmma_acc_col(t, i)] = acc[i];
#else
  __trap();  // wgmma exists on sm_90a only
#endif
}

}  // namespace moba

// D = A B^T: a is 64 x 16ks, b is N x 16ks (both K-contiguous), d is 64 x N fp32; ks in 1..8; one CTA of
// 128 threads with 1024 + 128 (64 + N) ceil(ks / 4) bytes of dynamic shared memory. MN = true: D = A B, b is
// 16ks x N (N contiguous), 1024 + 128 (64 ceil(ks / 4) + 16 ks ceil(N / 64)) bytes.
#define MOBA_WGMMA_PROBE(NAME, T, N, REG, MN)                                                     \
  extern "C" __global__ void __launch_bounds__(moba::WGMMA_PROBE_THREADS)                         \
      NAME(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ d, int ks) {     \
    moba::wgmma_probe<T, N, REG, MN>(a, b, d, ks);                                               \
  }

MOBA_WGMMA_PROBE(moba_wgmma_probe_bf16_n64_smem, __nv_bfloat16, 64, false, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_bf16_n128_smem, __nv_bfloat16, 128, false, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_fp16_n64_smem, __half, 64, false, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_fp16_n128_smem, __half, 128, false, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_bf16_n64_reg, __nv_bfloat16, 64, true, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_bf16_n128_reg, __nv_bfloat16, 128, true, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_fp16_n64_reg, __half, 64, true, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_fp16_n128_reg, __half, 128, true, false)
MOBA_WGMMA_PROBE(moba_wgmma_probe_bf16_n64_regmn, __nv_bfloat16, 64, true, true)
MOBA_WGMMA_PROBE(moba_wgmma_probe_bf16_n128_regmn, __nv_bfloat16, 128, true, true)
MOBA_WGMMA_PROBE(moba_wgmma_probe_fp16_n64_regmn, __half, 64, true, true)
MOBA_WGMMA_PROBE(moba_wgmma_probe_fp16_n128_regmn, __half, 128, true, true)
