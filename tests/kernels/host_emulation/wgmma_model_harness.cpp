// Runs warpgroup MMAs through wgmma_host_model.h on the host: D (64 x N) = A (64 x K) B^T, B given as N x K, each
// operand staged in shared memory by wgmma.cuh's own sw128_offset and read through its descriptor functions
// (wgmma_desc_sw128 K-major, wgmma_desc_sw128_mn MN-major), or A from registers, for tests without a GPU.
//
//   wgmma_model_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h, kernel "wgmma_case" (params, data, out): one CTA of 128 or 256
// threads; warpgroup g reads its case from params[WG_CASE_INTS g ..] (see Case), its A and B (16-bit values, row-
// major) from data and writes D (fp32, row-major 64 x N) into out. wgmma.cuh's text (wgmma.cuh in the build folder)
// is compiled with __CUDA_ARCH__ = 800 (encodings only), then the model.
#include "harness_io.h"
#include "ptx_host_model.h"

#define __CUDA_ARCH__ 800  // wgmma.cuh: encodings only; wgmma_host_model.h models the rest
#include "wgmma.cuh"
#include "wgmma_host_model.h"

namespace {

using harness::Arg;
using harness::P;

// What one warpgroup computes. kind: KIND_SS (wgmma_ss, both K-major), KIND_RS (wgmma_rs<T, trans_b>), KIND_SST
// (wgmma_ss_t<T, trans_a, trans_b>, N = 64). The K / 16 k-steps go in two commit groups (the first half, then the
// rest), waited for with wait_group<1> and then <0>. flags: see the FLAG_ constants.
struct Case {
    int kind, bf16, n, k, trans_a, trans_b, a_off, b_off, d_off, flags;
};
constexpr int WG_CASE_INTS = 10;
constexpr int KIND_SS = 0, KIND_RS = 1, KIND_SST = 2;
constexpr int FLAG_PACK_A = 1;         // rs: A registers from a 64 x K fp32 accumulator through wgmma_pack_a
constexpr int FLAG_SWIZZLE_64B = 2;    // B's descriptor names the 64-byte swizzle (the model must refuse it)
constexpr int FLAG_START_OFFSET = 4;   // B's descriptor start moved 32 bytes (MN-major: refused)
constexpr int FLAG_CLOBBER_B = 8;      // B zeroed after the first group is issued, before any wait
constexpr int FLAG_WARP3_LEAVES = 16;  // warp 3 of the warpgroup returns before the wait
constexpr int FLAG_NO_WAIT = 32;       // the warpgroup returns without waiting
constexpr unsigned REGION = 48 * 1024;  // shared memory per warpgroup: A (<= 16 KB), then B (<= 32 KB)

template <typename T, int R>
void issue(const Case& c, float (&d)[R], const unsigned (&a)[8][4], unsigned sa, unsigned sb, int ks) {
    const unsigned long long da =
        c.trans_a ? moba::wgmma_desc_sw128_mn(sa, ks, c.k, 64) : moba::wgmma_desc_sw128(sa, ks, 64);
    unsigned long long db =
        c.trans_b ? moba::wgmma_desc_sw128_mn(sb, ks, c.k, c.n) : moba::wgmma_desc_sw128(sb, ks, c.n);
    if (c.flags & FLAG_SWIZZLE_64B)
        db = (db & ~(3ull << 62)) | (static_cast<unsigned long long>(moba::WGMMA_SWIZZLE_64B) << 62);
    if (c.flags & FLAG_START_OFFSET) db += 2;  // 32 bytes, in the start field's 16-byte units
    const int scale_d = ks > 0;
    if (c.kind == KIND_SS) {
        moba::wgmma_ss<T>(d, da, db, scale_d);
    } else if (c.kind == KIND_RS) {
        if (c.trans_b)
            moba::wgmma_rs<T, 1>(d, a[ks], db, scale_d);
        else
            moba::wgmma_rs<T, 0>(d, a[ks], db, scale_d);
    } else if constexpr (R == 32) {
        if (c.trans_a && c.trans_b)
            moba::wgmma_ss_t<T, 1, 1>(d, da, db, scale_d);
        else if (c.trans_a)
            moba::wgmma_ss_t<T, 1, 0>(d, da, db, scale_d);
        else if (c.trans_b)
            moba::wgmma_ss_t<T, 0, 1>(d, da, db, scale_d);
        else
            moba::wgmma_ss_t<T, 0, 0>(d, da, db, scale_d);
    } else {
        emu::fail("wgmma_ss_t has N = 64 only");
    }
}

// false: the thread left without waiting (FLAG_WARP3_LEAVES).
template <typename T, int R>
bool run(const Case& c, const unsigned short* amat, unsigned sa, unsigned sb, unsigned char* smem_b, float* out) {
    const int t = threadIdx.x % 128, ksteps = c.k / 16;
    // A fragments of every k-step (wgmma.cuh, "Register Fragments"): register j, half h of thread t is element
    // row 16 w + l / 4 + 8 (j % 2), col 16 ks + 8 (j / 2) + 2 (l % 4) + h.
    unsigned a[8][4] = {};
    if (c.kind == KIND_RS && (c.flags & FLAG_PACK_A)) {
        float acc[64];  // A as a 64 x K accumulator (K <= 128): float i is (wgmma_acc_row, wgmma_acc_col)
        for (int i = 0; i < c.k / 2; ++i) {
            const unsigned short u = amat[moba::wgmma_acc_row(t, i) * c.k + moba::wgmma_acc_col(t, i)];
            acc[i] = c.bf16 ? __bfloat162float(__nv_bfloat16{u}) : __half2float(__half{u});
        }
        for (int ks = 0; ks < ksteps; ++ks) moba::wgmma_pack_a<T>(acc + 8 * ks, a[ks]);
    } else if (c.kind == KIND_RS) {
        const int w = t / 32, l = t % 32;
        for (int ks = 0; ks < ksteps; ++ks)
            for (int j = 0; j < 4; ++j)
                for (int h = 0; h < 2; ++h) {
                    const int row = 16 * w + l / 4 + 8 * (j % 2), col = 16 * ks + 8 * (j / 2) + 2 * (l % 4) + h;
                    a[ks][j] |= static_cast<unsigned>(amat[row * c.k + col]) << (16 * h);
                }
    }
    float d[R];
    for (int i = 0; i < R; ++i) d[i] = -1.f;  // scale-d 0 at k-step 0 must overwrite
    moba::wgmma_fence_operand(d);
    moba::wgmma_fence();
    for (int ks = 0; ks < ksteps / 2; ++ks) issue<T, R>(c, d, a, sa, sb, ks);
    moba::wgmma_commit_group();
    if (c.flags & FLAG_CLOBBER_B)  // a kernel bug: B overwritten while its MMAs are pending
        for (int i = t; i < c.n * c.k; i += 128) std::memset(smem_b + 2 * i, 0, 2);
    for (int ks = ksteps / 2; ks < ksteps; ++ks) issue<T, R>(c, d, a, sa, sb, ks);
    moba::wgmma_commit_group();
    if (c.flags & FLAG_NO_WAIT) return true;  // wgmma_check_idle stops the run
    if ((c.flags & FLAG_WARP3_LEAVES) && t / 32 == 3) return false;  // the others' wait stops the run
    moba::wgmma_wait_group<1>();
    moba::wgmma_wait_group<0>();
    moba::wgmma_fence_operand(d);
    for (int i = 0; i < R; ++i) out[moba::wgmma_acc_row(t, i) * c.n + moba::wgmma_acc_col(t, i)] = d[i];
    return true;
}

void wgmma_case(const int* params, const unsigned short* data, float* out) {
    const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
    const int* p = params + WG_CASE_INTS * wg;
    const Case c{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]};
    if (c.k % 16 || c.k > 128 || (c.n != 64 && c.n != 128)) emu::fail("harness: K in 16 .. 128, N 64 or 128");
    unsigned char* smem = emu::dynamic_smem();
    const unsigned base = (moba::smem_u32(smem) + moba::SW128_PATTERN_BYTES - 1) & ~(moba::SW128_PATTERN_BYTES - 1);
    const unsigned sa = base + wg * REGION, sb = sa + 16 * 1024;
    const unsigned short* amat = data + c.a_off;  // 64 x K
    const unsigned short* bmat = data + c.b_off;  // N x K
    // Stage the operands: K-major tiles hold rows of M (N) with K along the swizzled 128 bytes; MN-major ones hold a
    // row per element of K, M (N) along the 128 bytes, blocks of 64 elements of N k_rows * 128 bytes apart.
    if (c.kind != KIND_RS)
        for (int e = t; e < 64 * c.k; e += 128) {
            const int m = e / c.k, k = e % c.k;
            const unsigned off = c.trans_a ? moba::sw128_offset(k, m, c.k) : moba::sw128_offset(m, k, 64);
            std::memcpy(moba::smem_ptr(sa + off, 2), amat + e, 2);
        }
    for (int e = t; e < c.n * c.k; e += 128) {
        const int n = e / c.k, k = e % c.k;
        const unsigned off = c.trans_b ? moba::sw128_offset(k, n, c.k) : moba::sw128_offset(n, k, c.n);
        std::memcpy(moba::smem_ptr(sb + off, 2), bmat + e, 2);
    }
    moba::fence_proxy_async_shared();
    __syncthreads();
    unsigned char* smem_b = moba::smem_ptr(sb, 2);
    float* o = out + c.d_off;
    const bool waited = c.bf16 ? (c.n == 64 ? run<__nv_bfloat16, 32>(c, amat, sa, sb, smem_b, o)
                                            : run<__nv_bfloat16, 64>(c, amat, sa, sb, smem_b, o))
                               : (c.n == 64 ? run<__half, 32>(c, amat, sa, sb, smem_b, o)
                                            : run<__half, 64>(c, amat, sa, sb, smem_b, o));
    if (waited) moba::wgmma_check_idle();
}

const harness::Kernels kKernels = {
    {"wgmma_case", {3, [](const std::vector<Arg>& a) { wgmma_case(P<const int>(a[0]), P<const unsigned short>(a[1]),
                                                                  P<float>(a[2])); }}},
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("wgmma_model_harness", argc, argv, kKernels); }
