// Runs the launches of the mma.sync top-k kernels (cuda/topk.cu: topk_body and topk_split_body) on the host, for
// tests without a GPU.
//
//   topk_mma_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h. The kernel text is the source as NVRTC sees it (_build.source)
// with ptx.cuh skipped: topk_smem_model.h and the warp-wide models below stand for it. ldmatrix.x4 and mma.sync
// m16n8k16 are warp-wide: every lane publishes its operands (addresses or fragment registers) in a per-thread
// slot, the warp meets at __syncwarp, and each lane assembles what the PTX ISA fragment layouts give it, so a wrong
// fragment mapping, swizzle or warp tile gives wrong selections. Products of two 16-bit values are exact in fp32;
// the 16 of one k-step are summed in fp32 in k order.
#include "harness_io.h"
#include "topk_smem_model.h"

#include <type_traits>

namespace moba {

// Per-thread operand slots of the warp-wide models (threads of one CTA; CTAs run one after another).
inline unsigned (&warp_slots())[1024][6] {
    static unsigned slots[1024][6];
    return slots;
}

// ldmatrix.x4: lanes 8i .. 8i + 7 give the row addresses of matrix i; register i of lane l holds elements
// 2 (l % 4), 2 (l % 4) + 1 of row l / 4 of matrix i.
inline void ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    auto& slots = warp_slots();
    const int me = emu::cta().current, base = emu::warp_base(), lane = emu::lane();
    slots[me][0] = addr;
    __syncwarp();
    unsigned r[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned row = slots[base + 8 * i + lane / 4][0];
        std::memcpy(&r[i], smem_ptr(row + 4 * (lane % 4), 4), 4);
    }
    __syncwarp();  // every lane has read the addresses before the next call overwrites them
    r0 = r[0];
    r1 = r[1];
    r2 = r[2];
    r3 = r[3];
}

template <typename T>
struct Elem {
    static float half_of(unsigned reg, int hi) {
        T h;
        h.x = static_cast<unsigned short>(hi ? reg >> 16 : reg & 0xffffu);
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
            return __bfloat162float(h);
        } else {
            return __half2float(h);
        }
    }
    // c += A (16 x 16) B (16 x 8): lane l = 4 g + t holds A rows g, g + 8 (a0: row g k 2t.., a1: row g + 8 k 2t..,
    // a2: row g k 2t + 8.., a3: row g + 8 k 2t + 8..), B column g (b0: k 2t.., b1: k 2t + 8..), and C rows g, g + 8
    // at columns 2t, 2t + 1.
    static void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        auto& slots = warp_slots();
        const int me = emu::cta().current, base = emu::warp_base(), lane = emu::lane();
        for (int i = 0; i < 4; ++i) slots[me][i] = a[i];
        slots[me][4] = b0;
        slots[me][5] = b1;
        __syncwarp();
        const int g = lane / 4, t = lane % 4;
        float A[2][16], B[2][16];
        for (int tt = 0; tt < 4; ++tt) {
            const unsigned* s = slots[base + 4 * g + tt];
            for (int e = 0; e < 2; ++e) {
                A[0][2 * tt + e] = half_of(s[0], e);
                A[1][2 * tt + e] = half_of(s[1], e);
                A[0][2 * tt + 8 + e] = half_of(s[2], e);
                A[1][2 * tt + 8 + e] = half_of(s[3], e);
            }
            for (int n = 0; n < 2; ++n) {
                const unsigned* sb = slots[base + 4 * (2 * t + n) + tt];
                for (int e = 0; e < 2; ++e) {
                    B[n][2 * tt + e] = half_of(sb[4], e);
                    B[n][2 * tt + 8 + e] = half_of(sb[5], e);
                }
            }
        }
        __syncwarp();
        for (int r = 0; r < 2; ++r)
            for (int n = 0; n < 2; ++n) {
                float sum = 0.f;
                for (int k = 0; k < 16; ++k) sum += A[r][k] * B[n][k];
                c[2 * r + n] += sum;
            }
    }
};
}  // namespace moba

#include "topk_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define K(NAME, T)                                                                                           \
    {#NAME, {11, [](const std::vector<Arg>& a) {                                                             \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<int>(a[3]), I(a[4]), I(a[5]), I(a[6]), \
              I(a[7]), I(a[8]), I(a[9]), I(a[10]));                                                          \
     }}},

const harness::Kernels kKernels = {
#include "topk_kernel_table.inc"
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("topk_mma_harness", argc, argv, kKernels); }
