// Host models of the Hopper warpgroup MMA instructions of cuda/wgmma.cuh, for the host emulation (cuda_host.h).
// Included right after wgmma.cuh's text, which was compiled with __CUDA_ARCH__ = 800 so that only its encodings
// (descriptors, sw128_offset, accumulator layout) exist; the instruction wrappers are these models.
//
// wgmma.mma_async is modelled at its latest possible moment: an issued MMA only records its operands (the
// descriptors and the accumulator it writes); it reads shared memory and writes the accumulator when the issuing
// thread waits for its commit group (wgmma.wait_group N completes all but the newest N groups). Shared memory
// refilled while an MMA on it is pending therefore shows up as NaN (cp.async poisons on issue) or wrong data.
// An operand is read from its descriptor as the hardware reads a K-major operand with the 128-byte swizzle
// (PTX ISA, "Matrix Descriptor Format" and "Shared Memory Matrix Layout"): element (row, k) of a k-step of 16 sits
// at start + (row / 8) SBO + (row % 8) 128 + 2 k, with address bits 4-6 XORed with bits 7-9; anything else (other
// swizzle modes, a base offset, a start that is not in row 0 of a 1024-byte pattern) stops the run. Thread t of
// the warpgroup computes the accumulator floats it holds (wgmma_acc_row / wgmma_acc_col). Not modelled: the
// ordering rules of wgmma.fence and the async proxy (GPU tests), register-sourced A, transposed B.
#pragma once

#undef __CUDA_ARCH__
#undef MOBA_HAS_WGMMA
#define MOBA_HAS_WGMMA 1

namespace moba {

struct WgmmaOp {
    float* d;
    int n;  // N of m64nNk16
    unsigned long long da, db;
    int scale_d;
    bool bf16;
};
struct WgmmaThread {
    std::vector<WgmmaOp> open;
    std::vector<std::vector<WgmmaOp>> groups;
};
inline std::vector<WgmmaThread>& wgmma_threads() {
    static std::vector<WgmmaThread> t;
    return t;
}
inline WgmmaThread& wgmma_me() {
    auto& t = wgmma_threads();
    if (t.size() < emu::cta().threads.size()) t.resize(emu::cta().threads.size());
    return t[emu::cta().current];
}

template <typename T>
struct wgmma_ab {};

inline float wgmma_operand(unsigned long long desc, int row, int k, bool bf16) {
    if ((desc >> 62) != WGMMA_SWIZZLE_128B) emu::fail("wgmma model: only the 128-byte swizzle is modelled");
    if (((desc >> 49) & 7u) != 0) emu::fail("wgmma model: non-zero matrix base offset");
    const unsigned start = static_cast<unsigned>(desc & 0x3FFFu) << 4;
    const unsigned sbo = static_cast<unsigned>((desc >> 32) & 0x3FFFu) << 4;
    if (start & 0x380u) emu::fail("wgmma model: k-step start is not in row 0 of a 1024-byte swizzle pattern");
    unsigned addr = start + (row / 8) * sbo + (row % 8) * 128 + 2 * k;
    addr ^= ((addr >> 7) & 7u) << 4;
    unsigned short u;
    std::memcpy(&u, smem_ptr(addr, 2), 2);
    return bf16 ? __bfloat162float(__nv_bfloat16{u}) : __half2float(__half{u});
}

inline void wgmma_execute(const WgmmaOp& op) {
    const int t = emu::cta().current % 128;
    for (int i = 0; i < op.n / 2; ++i) {
        const int row = wgmma_acc_row(t, i), col = wgmma_acc_col(t, i);
        float s = 0.f;
        for (int k = 0; k < 16; ++k) s += wgmma_operand(op.da, row, k, op.bf16) * wgmma_operand(op.db, col, k, op.bf16);
        op.d[i] = op.scale_d ? op.d[i] + s : s;
    }
}

inline void wgmma_fence() {}
inline void fence_proxy_async_shared() {}
inline void wgmma_commit_group() {
    WgmmaThread& t = wgmma_me();
    t.groups.push_back(std::move(t.open));
    t.open.clear();
}
template <int N>
inline void wgmma_wait_group() {
    WgmmaThread& t = wgmma_me();
    while (t.groups.size() > static_cast<size_t>(N)) {
        for (const WgmmaOp& op : t.groups.front()) wgmma_execute(op);
        t.groups.erase(t.groups.begin());
    }
}
template <int R>
inline void wgmma_fence_operand(float (&)[R]) {}

template <typename T>
inline void wgmma_ss(float (&d)[64], unsigned long long da, unsigned long long db, int scale_d) {
    wgmma_me().open.push_back({d, 128, da, db, scale_d, std::is_same<T, __nv_bfloat16>::value});
}
template <typename T>
inline void wgmma_ss(float (&d)[32], unsigned long long da, unsigned long long db, int scale_d) {
    wgmma_me().open.push_back({d, 64, da, db, scale_d, std::is_same<T, __nv_bfloat16>::value});
}

}  // namespace moba
