// Host models of the Hopper warpgroup MMA instructions of cuda/wgmma.cuh, for the host emulation (cuda_host.h).
// Included right after wgmma.cuh's text, which was compiled with __CUDA_ARCH__ = 800 so that only its encodings
// (descriptors, sw128_offset, accumulator layout) exist; the instruction wrappers are these models: wgmma_ss (both
// operands K-major), wgmma_rs<T, TRANS_B> (A from registers; B K-major, or MN-major with TRANS_B = 1) at N = 64
// and 128 (wgmma_ss also at 32), wgmma_ss_t<T, TRANS_A, TRANS_B> (N = 64; either operand K- or MN-major), and wgmma_pack_a.
//
// wgmma.mma_async is modelled at its latest possible moment: an issued MMA only records its operands (the
// descriptors, the accumulator it writes and, from registers, the issuing thread's four A registers as they are
// at issue); it reads shared memory and writes the accumulators when its warpgroup waits for its commit group
// (wgmma.wait_group N completes all but the newest N groups). wait_group is .sync.aligned: the model's first meets
// the other 127 threads of the warpgroup (threads 128 g .. 128 g + 127 of the CTA; cuda_host.h's
// warpgroup_barrier, a barrier of its own), so every thread has issued the MMA and published its A registers;
// the first thread to leave the meeting then executes the warpgroup's oldest groups for all 128 threads, the MMA
// being one operation of the warpgroup, before any other thread of the CTA runs (so every thread's groups are as
// they were at the meeting); the threads that leave after it find that meeting settled and execute nothing, even
// where a thread that left before them has committed further groups (a thread may run from one wait to the next
// without any other barrier between). The threads of a warpgroup must have committed the same groups, and the
// i-th MMA of every thread the same N, types, descriptors and scale-d; anything else stops the run. Shared memory
// refilled while an MMA on it is pending therefore shows up as NaN (cp.async poisons on issue) or wrong data.
// The A fragment from registers ("Register Fragments"): register j, half h (low 16 bits first) of warpgroup
// thread t (warp w = t / 32, lane l) is element row 16 w + l / 4 + 8 (j % 2), col 8 (j / 2) + 2 (l % 4) + h.
// An operand in shared memory is read from its descriptor as the hardware reads it with the 128-byte swizzle
// (PTX ISA, "Matrix Descriptor Format", "Shared Memory Matrix Layout", "Strides"):
//   * K-major (imm-trans 0): element (row, k) of a k-step of 16 sits at start + (row / 8) SBO + (row % 8) 128 + 2 k;
//     a start that is not in row 0 of a 1024-byte pattern stops the run (LBO is not read).
//   * MN-major (imm-trans 1): element (mn, k) sits at start + (k / 8) SBO + (k % 8) 128 + 2 (mn % 64)
//     + (mn / 64) LBO: rows of 128 bytes along MN, one per element of K, 8-row groups of K SBO apart, 64-element
//     blocks of MN LBO apart (read only where N = 128; the roles wgmma_desc_sw128_mn gives the two fields, which the
//     probe's N = 128 MN-major cases check on hardware); a start that is not at the beginning of a 1024-byte
//     pattern, or an SBO (LBO, where read) that is not a multiple of 1024 stops the run.
// Both then XOR address bits 4-6 with bits 7-9; other swizzle modes and a non-zero base offset stop the run.
// Thread t of the warpgroup holds the accumulator floats of wgmma_acc_row / wgmma_acc_col; each is the fp32 sum of
// its 16 products in k order, then added to the accumulator (scale-d) or stored. Not modelled: the ordering rules of
// wgmma.fence and the async proxy (GPU tests), A registers rewritten between issue and wait (the values at issue are
// used), swizzles other than 128 bytes, and any MMA shape, type or operand layout that wgmma.cuh does not wrap.
#pragma once

#undef __CUDA_ARCH__
#undef MOBA_HAS_WGMMA
#define MOBA_HAS_WGMMA 1

namespace moba {

struct WgmmaOp {
    float* d;
    int n;  // N of m64nNk16
    unsigned long long da, db;  // da: unused when A comes from registers
    int scale_d;
    bool bf16;
    bool a_regs;             // A from registers (wgmma_rs)
    int trans_a, trans_b;    // imm-trans-a / imm-trans-b: 1 = MN-major
    unsigned a[4];           // the issuing thread's A registers at issue (a_regs)
};
struct WgmmaThread {
    std::vector<WgmmaOp> open;
    std::vector<std::vector<WgmmaOp>> groups;
    unsigned long long waits = 0;  // wgmma.wait_group meetings this thread has left
};
// Per warpgroup of the CTA (index 128 g): the meetings whose groups have been executed.
inline std::vector<unsigned long long>& wgmma_settled() {
    static std::vector<unsigned long long> s;
    return s;
}
inline std::vector<WgmmaThread>& wgmma_threads() {
    static std::vector<WgmmaThread> t;
    return t;
}
inline WgmmaThread& wgmma_me() {
    auto& t = wgmma_threads();
    if (t.size() < emu::cta().threads.size()) t.resize(emu::cta().threads.size());
    return t[emu::cta().current];
}
// A thread ends its kernel with every wgmma group waited for (harnesses call this when a kernel returns).
inline void wgmma_check_idle() {
    const WgmmaThread& t = wgmma_me();
    if (!t.open.empty() || !t.groups.empty()) emu::fail("a thread ended with wgmma groups it never waited for");
}

template <typename T>
struct wgmma_ab {};

// A descriptor's fields, checked for what the model reads.
struct WgmmaDesc {
    unsigned start, lbo, sbo;
};
inline WgmmaDesc wgmma_decode(unsigned long long desc, bool mn_major, int mn_extent) {
    if ((desc >> 62) != WGMMA_SWIZZLE_128B) emu::fail("wgmma model: only the 128-byte swizzle is modelled");
    if (((desc >> 49) & 7u) != 0) emu::fail("wgmma model: non-zero matrix base offset");
    const WgmmaDesc d{static_cast<unsigned>(desc & 0x3FFFu) << 4, static_cast<unsigned>((desc >> 16) & 0x3FFFu) << 4,
                      static_cast<unsigned>((desc >> 32) & 0x3FFFu) << 4};
    if (!mn_major) {
        if (d.start & 0x380u) emu::fail("wgmma model: k-step start is not in row 0 of a 1024-byte swizzle pattern");
        return d;
    }
    if (d.start & 0x3F0u)
        emu::fail("wgmma model: MN-major k-step start is not at the beginning of a 1024-byte swizzle pattern");
    if (d.sbo % SW128_PATTERN_BYTES) emu::fail("wgmma model: MN-major SBO is not a multiple of 1024 bytes");
    if (mn_extent > static_cast<int>(SW128_KBLOCK) && d.lbo % SW128_PATTERN_BYTES)
        emu::fail("wgmma model: MN-major LBO (between 64-element blocks of N) is not a multiple of 1024 bytes");
    return d;
}
// Element (mn, k) of a k-step (row = M or N index) of the operand described by d.
inline float wgmma_element(const WgmmaDesc& d, bool mn_major, int mn, int k, bool bf16) {
    unsigned addr = mn_major ? d.start + (k / 8) * d.sbo + (k % 8) * 128 + 2 * (mn % 64) + (mn / 64) * d.lbo
                             : d.start + (mn / 8) * d.sbo + (mn % 8) * 128 + 2 * k;
    addr ^= ((addr >> 7) & 7u) << 4;
    unsigned short u;
    std::memcpy(&u, smem_ptr(addr, 2), 2);
    return bf16 ? __bfloat162float(__nv_bfloat16{u}) : __half2float(__half{u});
}

inline float wgmma_reg_half(unsigned reg, int h, bool bf16) {
    const unsigned short u = static_cast<unsigned short>(h ? reg >> 16 : reg & 0xFFFFu);
    return bf16 ? __bfloat162float(__nv_bfloat16{u}) : __half2float(__half{u});
}

// The j-th MMA of the front group of every thread of warpgroup g (threads 128 g ..), executed for all of them.
inline void wgmma_execute(int g, size_t j) {
    auto& th = wgmma_threads();
    const WgmmaOp& op = th[128 * g].groups.front()[j];
    for (int t = 1; t < 128; ++t) {
        const WgmmaOp& o = th[128 * g + t].groups.front()[j];
        if (o.n != op.n || o.bf16 != op.bf16 || o.a_regs != op.a_regs || o.trans_a != op.trans_a ||
            o.trans_b != op.trans_b || (!op.a_regs && o.da != op.da) || o.db != op.db ||
            (o.scale_d != 0) != (op.scale_d != 0))
            emu::fail("wgmma model: the threads of a warpgroup issued different MMAs (shape, type, descriptors or "
                      "scale-d)");
    }
    static float A[64][16], B[128][16];
    if (op.a_regs) {
        for (int t = 0; t < 128; ++t)
            for (int j2 = 0; j2 < 4; ++j2)
                for (int h = 0; h < 2; ++h)
                    A[16 * (t / 32) + (t % 32) / 4 + 8 * (j2 % 2)][8 * (j2 / 2) + 2 * (t % 4) + h] =
                        wgmma_reg_half(th[128 * g + t].groups.front()[j].a[j2], h, op.bf16);
    } else {
        const WgmmaDesc da = wgmma_decode(op.da, op.trans_a, 64);
        for (int m = 0; m < 64; ++m)
            for (int k = 0; k < 16; ++k) A[m][k] = wgmma_element(da, op.trans_a, m, k, op.bf16);
    }
    const WgmmaDesc db = wgmma_decode(op.db, op.trans_b, op.n);
    for (int n = 0; n < op.n; ++n)
        for (int k = 0; k < 16; ++k) B[n][k] = wgmma_element(db, op.trans_b, n, k, op.bf16);
    for (int t = 0; t < 128; ++t) {
        const WgmmaOp& o = th[128 * g + t].groups.front()[j];
        for (int i = 0; i < op.n / 2; ++i) {
            const int row = wgmma_acc_row(t, i), col = wgmma_acc_col(t, i);
            float s = 0.f;
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[col][k];
            o.d[i] = o.scale_d ? o.d[i] + s : s;
        }
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
    WgmmaThread& me = wgmma_me();  // sized for this CTA
    emu::warpgroup_barrier();
    const int g = emu::cta().current / 128;
    auto& settled = wgmma_settled();
    if (settled.size() <= static_cast<size_t>(g)) settled.resize(g + 1, 0);
    ++me.waits;
    if (settled[g] >= me.waits) return;  // a thread that left this meeting before has executed its groups
    settled[g] = me.waits;
    auto& th = wgmma_threads();
    for (int t = 1; t < 128; ++t)
        if (th[128 * g + t].groups.size() != th[128 * g].groups.size())
            emu::fail("wgmma model: the threads of a warpgroup committed different numbers of wgmma groups");
    while (th[128 * g].groups.size() > static_cast<size_t>(N)) {  // the first thread out executes them for all
        const size_t n_ops = th[128 * g].groups.front().size();
        for (int t = 1; t < 128; ++t)
            if (th[128 * g + t].groups.front().size() != n_ops)
                emu::fail("wgmma model: the threads of a warpgroup committed groups of different MMAs");
        for (size_t j = 0; j < n_ops; ++j) wgmma_execute(g, j);
        for (int t = 0; t < 128; ++t) th[128 * g + t].groups.erase(th[128 * g + t].groups.begin());
    }
}
template <int R>
inline void wgmma_fence_operand(float (&)[R]) {}

template <typename T>
inline void wgmma_record(float* d, int n, unsigned long long da, unsigned long long db, int scale_d, bool a_regs,
                         int trans_a, int trans_b, const unsigned* a) {
    WgmmaOp op{d, n, da, db, scale_d, std::is_same<T, __nv_bfloat16>::value, a_regs, trans_a, trans_b, {0, 0, 0, 0}};
    if (a_regs) std::memcpy(op.a, a, sizeof op.a);
    wgmma_me().open.push_back(op);
}

template <typename T>
inline void wgmma_ss(float (&d)[64], unsigned long long da, unsigned long long db, int scale_d) {
    wgmma_record<T>(d, 128, da, db, scale_d, false, 0, 0, nullptr);
}
template <typename T>
inline void wgmma_ss(float (&d)[32], unsigned long long da, unsigned long long db, int scale_d) {
    wgmma_record<T>(d, 64, da, db, scale_d, false, 0, 0, nullptr);
}
template <typename T>
inline void wgmma_ss(float (&d)[16], unsigned long long da, unsigned long long db, int scale_d) {
    wgmma_record<T>(d, 32, da, db, scale_d, false, 0, 0, nullptr);
}
template <typename T, int TRANS_A, int TRANS_B>
inline void wgmma_ss_t(float (&d)[32], unsigned long long da, unsigned long long db, int scale_d) {
    static_assert((TRANS_A == 0 || TRANS_A == 1) && (TRANS_B == 0 || TRANS_B == 1), "imm-trans is 0 or 1");
    wgmma_record<T>(d, 64, da, db, scale_d, false, TRANS_A, TRANS_B, nullptr);
}
template <typename T, int TRANS_B = 0>
inline void wgmma_rs(float (&d)[32], const unsigned (&a)[4], unsigned long long db, int scale_d) {
    static_assert(TRANS_B == 0 || TRANS_B == 1, "imm-trans-b is 0 or 1");
    wgmma_record<T>(d, 64, 0, db, scale_d, true, 0, TRANS_B, a);
}
template <typename T, int TRANS_B = 0>
inline void wgmma_rs(float (&d)[64], const unsigned (&a)[4], unsigned long long db, int scale_d) {
    static_assert(TRANS_B == 0 || TRANS_B == 1, "imm-trans-b is 0 or 1");
    wgmma_record<T>(d, 128, 0, db, scale_d, true, 0, TRANS_B, a);
}

// Two floats -> one register of an A fragment (low half = lower column), rounded to nearest even.
inline unsigned wgmma_pack2(wgmma_ab<__nv_bfloat16>, float lo, float hi) {
    return (unsigned)__float2bfloat16_rn(lo).x | ((unsigned)__float2bfloat16_rn(hi).x << 16);
}
inline unsigned wgmma_pack2(wgmma_ab<__half>, float lo, float hi) {
    return (unsigned)__float2half_rn(lo).x | ((unsigned)__float2half_rn(hi).x << 16);
}
template <typename T>
inline void wgmma_pack_a(const float* p, unsigned (&a)[4]) {
    for (int j = 0; j < 4; ++j) a[j] = wgmma_pack2(wgmma_ab<T>{}, p[2 * j], p[2 * j + 1]);
}

}  // namespace moba
