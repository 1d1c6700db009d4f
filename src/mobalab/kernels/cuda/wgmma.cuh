// Hopper (sm_90a) warpgroup tensor-core helpers: wgmma.mma_async with operands in shared memory (and A
// from registers), the shared-memory matrix descriptor, the 128-byte-swizzled K-major tile layout a
// producer writes so that wgmma reads it, the fences and groups that order the asynchronous MMAs, and the
// accumulator fragment mapping. Built and validated by cuda/wgmma_probe.cu; the wgmma forward tile kernel
// (cuda/attention_wgmma.cuh) uses it (see docs/design.md, "Hopper path").
//
// Sources for every encoding below are sections of NVIDIA's PTX ISA (8.x), chapter "Asynchronous Warpgroup
// Level Matrix Multiply-Accumulate Instructions":
//   * "Matrix Descriptor Format" (under "Asynchronous Warpgroup Level Matrix Shared Memory Layout"): the
//     64-bit descriptor of a shared-memory operand,
//        bits  0-13  matrix start address:            (addr & 0x3FFFF) >> 4
//        bits 16-29  leading dimension byte offset:   (LBO & 0x3FFFF) >> 4
//        bits 32-45  stride dimension byte offset:    (SBO & 0x3FFFF) >> 4
//        bits 49-51  matrix base offset (0: every swizzle pattern here starts 1024-byte aligned)
//        bits 62-63  swizzle mode: 0 none, 1 128-byte, 2 64-byte, 3 32-byte
//     all other bits zero. LBO is the distance between core matrices (8 rows x 16 bytes) adjacent in K,
//     SBO between those adjacent in M (A) or N (B).
//   * "Shared Memory Matrix Layout" / "Swizzling modes": with the 128-byte swizzle, a K-major operand is
//     stored as rows of 128 bytes (64 bf16/fp16 elements of K); eight consecutive rows form a 1024-byte
//     pattern (aligned to 1024 bytes), inside which the 16-byte chunk c of row r sits at chunk c ^ (r % 8).
//     In address bits: bits 4-6 are XORed with bits 7-9. Groups of 8 rows follow each other at SBO = 1024
//     bytes; K beyond 64 elements goes to a further block of rows x 128 bytes (a new "column" of patterns,
//     which a k-step descriptor addresses by its start address, so LBO is not used: the swizzled K-major
//     case ignores it, and it is set to 16 bytes, encoded 1).
//     A k-step of 16 elements (32 bytes) inside the 128-byte width is addressed by advancing the start
//     address by 32 bytes: the hardware applies the XOR to the final address bits, so the rows of the
//     pattern still land on their swizzled chunks (base offset stays 0 because the pattern is aligned).
//   * "Register Fragments" (wgmma .m64nNk16 accumulator D, f32): thread t of the warpgroup (warp w = t / 32,
//     lane l = t % 32) holds N/2 floats; float i is element
//        row = 16 w + l / 4 + 8 ((i / 2) % 2),   col = 8 (i / 4) + 2 (l % 4) + i % 2,
//     i.e. each warp owns 16 rows, laid out per 8 columns like the mma.sync m16n8 accumulator.
//     Operand A from registers (.m64nNk16, bf16/f16): four 32-bit registers a0..a3 of two elements each;
//     register j, half h (low 16 bits first) is element row = 16 w + l / 4 + 8 (j % 2), col = 8 (j / 2)
//     + 2 (l % 4) + h. Hence floats 8s .. 8s+7 of a 64xN accumulator are exactly the A fragment of its
//     columns 16s .. 16s+15, packed in order (wgmma_pack_a): P = softmax(S) feeds P.V without a shuffle.
//   * "wgmma.fence", "wgmma.commit_group", "wgmma.wait_group": wgmma.fence before the first wgmma and
//     whenever the accumulator or A registers were written by other instructions; the MMAs of a commit
//     group are complete (registers readable, shared memory reusable) after wait_group(N) leaves at most
//     N groups pending. Shared memory written by ordinary stores must be made visible to the asynchronous
//     proxy (fence.proxy.async.shared::cta) before a barrier and the wgmma that reads it.
// Instruction operands: wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16} d, a-desc | {a},
// b-desc, scale-d (predicate: D = A B + D when true, D = A B when false), imm-scale-a, imm-scale-b (1: no
// negation), imm-trans-a (shared A only), imm-trans-b (0: the operand is K-major, the layout above; 1: it is
// MN-major, "transposed", allowed for the 16-bit types only).
//   * MN-major B with the 128-byte swizzle ("Shared Memory Matrix Layout", the MN-major canonical layouts;
//     "Strides"): rows of 128 bytes now run along N (64 elements), one row per element of K, eight rows of K
//     per 1024-byte pattern with the same chunk XOR; N beyond 64 is a further block of rows at the leading
//     dimension byte offset (LBO), and the 8-row groups of K follow each other at the stride dimension byte
//     offset (SBO). This is V as stored (keys x d, d contiguous) for O = P V: keys are the K of that product.
//     The rs wrappers take imm-trans-b as a template argument (TRANS_B); wgmma_desc_sw128_mn builds the
//     descriptor; the probe's "regmn" kernels check it on hardware.
//
// The encodings are __host__ __device__ constexpr (checked at compile time by the static_asserts below and
// in a host test); the instruction wrappers exist only where wgmma does: the device pass for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL), and the host pass, which parses but never emits them. MOBA_HAS_WGMMA says
// which; a kernel guards its wgmma body with it.
#ifndef MOBALAB_WGMMA_CUH
#define MOBALAB_WGMMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOBA_HAS_WGMMA 1
#else
#define MOBA_HAS_WGMMA 0
#endif

namespace moba {

// ---- encodings (pure integer arithmetic) --------------------------------------------------------------

// swizzle mode field values (bits 62-63)
enum WgmmaSwizzle : unsigned { WGMMA_SWIZZLE_NONE = 0, WGMMA_SWIZZLE_128B = 1, WGMMA_SWIZZLE_64B = 2, WGMMA_SWIZZLE_32B = 3 };
constexpr unsigned SW128_ROW_BYTES = 128;      // one row of a 128-byte-swizzled K-major tile
constexpr unsigned SW128_PATTERN_BYTES = 1024;  // 8 rows: the swizzle repeat, also SBO and the alignment
constexpr unsigned SW128_KBLOCK = 64;           // 2-byte elements of K per row

// Matrix descriptor ("Matrix Descriptor Format"): shared-memory byte address, LBO and SBO in bytes
// (multiples of 16), swizzle mode; the matrix base offset is 0.
__host__ __device__ constexpr unsigned long long wgmma_desc(unsigned smem_addr, unsigned lbo_bytes,
                                                            unsigned sbo_bytes, unsigned swizzle) {
  return static_cast<unsigned long long>((smem_addr & 0x3FFFFu) >> 4) |
         (static_cast<unsigned long long>((lbo_bytes & 0x3FFFFu) >> 4) << 16) |
         (static_cast<unsigned long long>((sbo_bytes & 0x3FFFFu) >> 4) << 32) |
         (static_cast<unsigned long long>(swizzle & 3u) << 62);
}

// Byte offset of element (row, k) in a K-major tile of 2-byte elements with the 128-byte swizzle, `rows`
// rows (a multiple of 8) per 64-element block of K; the tile starts 1024-byte aligned. Blocks of K follow
// each other: [k / 64][row][128 bytes].
__host__ __device__ constexpr unsigned sw128_offset(unsigned row, unsigned k, unsigned rows) {
  return (k / SW128_KBLOCK) * rows * SW128_ROW_BYTES + row * SW128_ROW_BYTES +
         ((((k % SW128_KBLOCK) / 8) ^ (row % 8)) << 4) + (k % 8) * 2;
}

// Bytes of such a tile holding `k` elements of K (rounded up to whole 64-element blocks).
__host__ __device__ constexpr unsigned sw128_tile_bytes(unsigned rows, unsigned k) {
  return (k + SW128_KBLOCK - 1) / SW128_KBLOCK * rows * SW128_ROW_BYTES;
}

// A descriptor `bytes` further into shared memory: the address field (bits 0-13, address / 16) plus bytes / 16,
// computed on the low word alone. Exact while the address stays below 256 KB, which every shared address does
// (228 KB per SM), so the field never carries into LBO. A kernel builds a tile's descriptor once and steps it:
// one add per k-step instead of the masks and shifts of wgmma_desc.
__host__ __device__ constexpr unsigned long long wgmma_desc_plus(unsigned long long desc, unsigned bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | static_cast<unsigned>(static_cast<unsigned>(desc) + (bytes >> 4));
}

// Descriptor of k-step `kstep` (K elements 16 kstep .. 16 kstep + 15) of the tile at shared address `tile`.
__host__ __device__ constexpr unsigned long long wgmma_desc_sw128(unsigned tile, unsigned kstep, unsigned rows) {
  return wgmma_desc(tile + sw128_offset(0, 16 * kstep, rows), 16, SW128_PATTERN_BYTES, WGMMA_SWIZZLE_128B);
}

// Descriptor of k-step `kstep` (K rows 16 kstep .. 16 kstep + 15) of an MN-major B operand of width n (64 or
// 128) stored with sw128_offset(k, n_index, k_rows): K plays the row, MN the 128-byte swizzled direction, in
// blocks of 64 elements of N, k_rows * 128 bytes apart (the same bytes as a K-major tile of k_rows rows, so V
// staged like K serves P V). SBO = 1024: the distance between 8-row groups along K; LBO: the distance between
// 64-element blocks of N, k_rows * 128. At n = 64 there is one block and LBO is unused: it is set to 1024 like
// SBO, so that the descriptor is right whichever of the two fields the hardware reads as the K-group stride
// (the N = 128 probe cases settle the assignment above).
__host__ __device__ constexpr unsigned long long wgmma_desc_sw128_mn(unsigned tile, unsigned kstep, unsigned k_rows,
                                                                     unsigned n) {
  return wgmma_desc(tile + sw128_offset(16 * kstep, 0, k_rows), n > SW128_KBLOCK ? k_rows * SW128_ROW_BYTES
                                                                                 : SW128_PATTERN_BYTES,
                    SW128_PATTERN_BYTES, WGMMA_SWIZZLE_128B);
}

// Element of a 64xN fp32 accumulator that float i of warpgroup thread t (0..127) holds ("Register Fragments").
__host__ __device__ constexpr int wgmma_acc_row(int t, int i) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
__host__ __device__ constexpr int wgmma_acc_col(int t, int i) { return 8 * (i / 4) + 2 * (t % 4) + i % 2; }

// Hand-derived values (see the layouts above); a wrong edit fails every compile.
static_assert(wgmma_desc(0x400, 16, 1024, WGMMA_SWIZZLE_128B) == 0x4000004000010040ull, "descriptor packing");
static_assert(wgmma_desc(0x3FFF0, 0x3FFF0, 0x3FFF0, WGMMA_SWIZZLE_32B) == 0xC0003FFF3FFF3FFFull, "field widths");
static_assert(sw128_offset(0, 0, 64) == 0 && sw128_offset(0, 8, 64) == 16 && sw128_offset(1, 0, 64) == 128 + 16,
              "row 1 chunk 0 sits in chunk 1");
static_assert(sw128_offset(7, 63, 64) == 7 * 128 + (7 ^ 7) * 16 + 14, "last element of the pattern's row 7");
static_assert(sw128_offset(9, 64, 64) == 64 * 128 + 9 * 128 + 16, "second K block, row 9 (pattern row 1)");
static_assert(wgmma_desc_sw128_mn(0x400, 3, 128, 128) == 0x40000040040001c0ull &&
                  wgmma_desc_sw128_mn(0x400, 1, 64, 64) == 0x40000040004000c0ull,
              "MN-major: k-step 3 starts 48 rows (6144 bytes) in; LBO 16384 (128 rows) at n 128, 1024 at n 64");
static_assert(wgmma_desc_plus(wgmma_desc_sw128(0x1C400, 0, 64), sw128_offset(0, 16 * 5, 64)) ==
                      wgmma_desc_sw128(0x1C400, 5, 64) &&
                  wgmma_desc_plus(wgmma_desc_sw128_mn(0x30400, 0, 128, 128), sw128_offset(16 * 7, 0, 128)) ==
                      wgmma_desc_sw128_mn(0x30400, 7, 128, 128),
              "stepping a descriptor equals building it at the k-step");
static_assert(wgmma_acc_row(127, 63) == 63 && wgmma_acc_col(127, 63) == 127 && wgmma_acc_row(0, 2) == 8,
              "accumulator corners");

// ---- instructions (sm_90a) ---------------------------------------------------------------------------
#if MOBA_HAS_WGMMA

template <typename T>
struct wgmma_ab {};  // selects the input type of a wrapper (bf16 or f16)

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Wait until at most N committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Make this thread's ordinary shared-memory stores visible to wgmma's (asynchronous proxy) reads; a barrier
// must still follow before another thread's wgmma reads them.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Pin the accumulator registers at this point: the compiler sees the wgmma asm as writing them when it is
// issued, so without this it could read them (or reuse them) before wgmma_wait_group has returned.
template <int R>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Two floats -> one register of an A fragment (low half = lower column), rounded to nearest.
__device__ __forceinline__ unsigned wgmma_pack2(wgmma_ab<__nv_bfloat16>, float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned wgmma_pack2(wgmma_ab<__half>, float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
// A fragment of K columns 16s .. 16s+15 from floats 8s .. 8s+7 of a 64xN accumulator (same thread).
template <typename T>
__device__ __forceinline__ void wgmma_pack_a(const float* p, unsigned (&a)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j] = wgmma_pack2(wgmma_ab<T>{}, p[2 * j], p[2 * j + 1]);
}

// D(64xN) = A * B + (scale_d ? D : 0) with fp32 accumulators, B (16xN) from shared memory (K-major), A (64x16)
// from shared memory (_ss) or registers (_rs): one wrapper per N in {64, 128} (and 32 for _ss: S of a 32-key
// block), input type and A source, made by
// the two macros below (the PTX type is part of the mnemonic, so each needs its own asm string). Operands: the
// R accumulators are %0 .. %R-1, then A (a descriptor, or four registers), the B descriptor, scale_d (-> p).
#define MOBA_WGMMA_ACC16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define MOBA_WGMMA_ACC32 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MOBA_WGMMA_ACC64 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
    " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
    " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define MOBA_WGMMA_OUT16 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define MOBA_WGMMA_OUT32 MOBA_WGMMA_OUT16,  \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MOBA_WGMMA_OUT64 MOBA_WGMMA_OUT32,  \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

#define MOBA_WGMMA_SS(N, R, T, PTX_T, ACC, OUT, OP_A, OP_B, OP_SCALE)                                              \
  __device__ __forceinline__ void wgmma_m64n##N##k16_ss(wgmma_ab<T>, float (&d)[R], unsigned long long desc_a,    \
                                                         unsigned long long desc_b, int scale_d) {                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " OP_SCALE ", 0;\n"                                               \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " " ACC ", " OP_A ", " OP_B      \
                 ", p, 1, 1, 0, 0;\n}\n"                                                                             \
                 : OUT                                                                                             \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                        \
  }

// The rs wrappers take imm-trans-b as TRANS_B (1: B is MN-major, the layout of V in O = P V).
#define MOBA_WGMMA_RS(N, R, T, PTX_T, ACC, OUT, OP_A, OP_B, OP_SCALE, OP_TRANS)                                    \
  template <int TRANS_B = 0>                                                                                       \
  __device__ __forceinline__ void wgmma_m64n##N##k16_rs(wgmma_ab<T>, float (&d)[R], const unsigned (&a)[4],       \
                                                         unsigned long long desc_b, int scale_d) {                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " OP_SCALE ", 0;\n"                                               \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " " ACC ", " OP_A ", " OP_B      \
                 ", p, 1, 1, " OP_TRANS ";\n}\n"                                                                     \
                 : OUT                                                                                             \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));          \
  }

MOBA_WGMMA_SS(32, 16, __nv_bfloat16, "bf16", MOBA_WGMMA_ACC16, MOBA_WGMMA_OUT16, "%16", "%17", "%18")
MOBA_WGMMA_SS(64, 32, __nv_bfloat16, "bf16", MOBA_WGMMA_ACC32, MOBA_WGMMA_OUT32, "%32", "%33", "%34")
MOBA_WGMMA_RS(64, 32, __nv_bfloat16, "bf16", MOBA_WGMMA_ACC32, MOBA_WGMMA_OUT32, "{%32, %33, %34, %35}", "%36", "%37",
              "%38")
MOBA_WGMMA_SS(128, 64, __nv_bfloat16, "bf16", MOBA_WGMMA_ACC64, MOBA_WGMMA_OUT64, "%64", "%65", "%66")
MOBA_WGMMA_RS(128, 64, __nv_bfloat16, "bf16", MOBA_WGMMA_ACC64, MOBA_WGMMA_OUT64, "{%64, %65, %66, %67}", "%68", "%69",
              "%70")
MOBA_WGMMA_SS(32, 16, __half, "f16", MOBA_WGMMA_ACC16, MOBA_WGMMA_OUT16, "%16", "%17", "%18")
MOBA_WGMMA_SS(64, 32, __half, "f16", MOBA_WGMMA_ACC32, MOBA_WGMMA_OUT32, "%32", "%33", "%34")
MOBA_WGMMA_RS(64, 32, __half, "f16", MOBA_WGMMA_ACC32, MOBA_WGMMA_OUT32, "{%32, %33, %34, %35}", "%36", "%37",
              "%38")
MOBA_WGMMA_SS(128, 64, __half, "f16", MOBA_WGMMA_ACC64, MOBA_WGMMA_OUT64, "%64", "%65", "%66")
MOBA_WGMMA_RS(128, 64, __half, "f16", MOBA_WGMMA_ACC64, MOBA_WGMMA_OUT64, "{%64, %65, %66, %67}", "%68", "%69",
              "%70")

// Both operands from shared memory with imm-trans-a / imm-trans-b as template arguments (1: the operand is
// MN-major, wgmma_desc_sw128_mn; 16-bit types only), N = 64: dQ = dS K in the backward reads dS from its stored
// transpose (keys x rows, rows contiguous) and K as stored (keys x d, d contiguous), both MN-major.
#define MOBA_WGMMA_SST(N, R, T, PTX_T, ACC, OUT, OP_A, OP_B, OP_SCALE, OP_TA, OP_TB)                              \
  template <int TRANS_A, int TRANS_B>                                                                              \
  __device__ __forceinline__ void wgmma_m64n##N##k16_sst(wgmma_ab<T>, float (&d)[R], unsigned long long desc_a,   \
                                                          unsigned long long desc_b, int scale_d) {                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " OP_SCALE ", 0;\n"                                              \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " " ACC ", " OP_A ", " OP_B      \
                 ", p, 1, 1, " OP_TA ", " OP_TB ";\n}\n"                                                             \
                 : OUT                                                                                             \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));                            \
  }

MOBA_WGMMA_SST(64, 32, __nv_bfloat16, "bf16", MOBA_WGMMA_ACC32, MOBA_WGMMA_OUT32, "%32", "%33", "%34", "%35", "%36")
MOBA_WGMMA_SST(64, 32, __half, "f16", MOBA_WGMMA_ACC32, MOBA_WGMMA_OUT32, "%32", "%33", "%34", "%35", "%36")

// Width-generic entry points: the accumulator's size picks N (16 floats: N = 32, 32: N = 64, 64: N = 128).
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[16], unsigned long long da, unsigned long long db, int scale_d) {
  wgmma_m64n32k16_ss(wgmma_ab<T>{}, d, da, db, scale_d);
}
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], unsigned long long da, unsigned long long db, int scale_d) {
  wgmma_m64n64k16_ss(wgmma_ab<T>{}, d, da, db, scale_d);
}
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[64], unsigned long long da, unsigned long long db, int scale_d) {
  wgmma_m64n128k16_ss(wgmma_ab<T>{}, d, da, db, scale_d);
}
template <typename T, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_ss_t(float (&d)[32], unsigned long long da, unsigned long long db, int scale_d) {
  wgmma_m64n64k16_sst<TRANS_A, TRANS_B>(wgmma_ab<T>{}, d, da, db, scale_d);
}
// TRANS_B = 1: B is MN-major (wgmma_desc_sw128_mn), the layout of V in O = P V.
template <typename T, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const unsigned (&a)[4], unsigned long long db, int scale_d) {
  wgmma_m64n64k16_rs<TRANS_B>(wgmma_ab<T>{}, d, a, db, scale_d);
}
template <typename T, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const unsigned (&a)[4], unsigned long long db, int scale_d) {
  wgmma_m64n128k16_rs<TRANS_B>(wgmma_ab<T>{}, d, a, db, scale_d);
}

#endif  // MOBA_HAS_WGMMA

}  // namespace moba

#endif  // MOBALAB_WGMMA_CUH
