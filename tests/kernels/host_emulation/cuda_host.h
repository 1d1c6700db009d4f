// Run CUDA kernel bodies on the host, for tests without a GPU.
//
// Every CUDA thread of a CTA is a coroutine with its own stack; the CTA's threads run one at a
// time and switch only at synchronisation points: __syncthreads (all live threads of the CTA), and the warp
// operations (__syncwarp, __shfl_xor_sync, __any_sync: the 32 lanes of the warp). Between two such points
// the threads run in a shuffled order, so code that reads what another thread writes without a barrier
// gives order-dependent results. A barrier that not every thread reaches (divergent __syncthreads or a
// shuffle inside divergent code) stops the run with an error instead of hanging. A named barrier or warpgroup
// meeting (below) that its last thread reaches is released either at once, starting a new shuffled round in which
// its threads may run before threads that have not reached their next synchronisation point, or only when no thread
// can run, at random (release_at_once); other barriers wait until no thread can run. The models of warpgroup
// instructions (wgmma.wait_group) meet the 128 threads 128 g .. 128 g + 127 of the CTA at a barrier of their own
// (warpgroup_barrier), apart from __syncthreads and the named barriers 1..15 that kernels use. CTAs run one after
// another in a shuffled order. Dynamic shared memory is an allocation of exactly the launch's size (1 KB-aligned, as
// on the GPU) filled with 0xff (NaN as float), so AddressSanitizer catches accesses beyond it and unwritten reads
// show up as NaN.
//
// cp.async: a copy poisons its 16 destination bytes when issued and lands only when the issuing thread
// waits for its commit group (cp.async.wait_group N completes all but the newest N groups), the latest
// moment the hardware allows; a CTA that ends with copies not waited for is an error. So reading a stage
// before its wait, or refilling a stage another thread still reads, shows up as NaN.
// Tensor-map bulk copies on mbarriers: a copy poisons its destination box when issued and lands, with the copy
// engine's 128-byte swizzle and zeros outside the tensor, only when a thread waits on its barrier's phase after
// every arrival of that phase has come; the bytes landed must then equal the bytes the arrivals announced, a
// destination must be 1 KB-aligned in the CTA's shared memory, and a CTA that ends with copies no thread waited
// for is an error.
// Work tickets (the decode step's persistent CTAs): the ticket counter hands out a random order of the
// routing tickets, then a random order of the attention tickets (any order the GPU could produce), so every
// item can be the last of its group; the first CTA to run takes every item in that order, and its shared
// memory is poisoned again at the start of each item. A wait for a counter that no earlier item raised is an
// error (on the GPU it would spin).
//
// Not modelled: warp-synchronous execution without explicit sync, memory ordering between CTAs (they do
// not overlap), timing, and PTX (the kernel file swaps its cp.async / ld.cg / acquire helpers for the
// models here).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#define DEC_HOST_EMULATION 1
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__

// A tensor map as the host emulation models it (the GPU's is the driver's opaque 128-byte encoding): a row-major
// (rows, cols) tensor of 2-byte elements and a box of box_rows x box_cols, 128-byte swizzle.
struct moba_tensor_map {
    const unsigned char* base = nullptr;
    long long rows = 0, cols = 0, box_rows = 0, box_cols = 0;
};

using std::max;
using std::min;

struct uint4 {
    unsigned x, y, z, w;
};
struct int4 {
    int x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct float4 {
    float x, y, z, w;
};
struct float2 {
    float x, y;
};
struct dim3 {
    unsigned x, y, z;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

// 16-bit float types: storage only, converted exactly as the CUDA intrinsics do (round to nearest even).
struct __nv_bfloat16 {
    unsigned short x;
    explicit operator float() const;  // static_cast<float>, as the CUDA types allow
};
struct __half {
    unsigned short x;
    explicit operator float() const;
};
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
// Exact, from the bits: the compiler's _Float16 conversion is a libgcc call without F16C (a fifth of an fp16
// emulation's time). A subnormal is its 10-bit integer times 2^-24, exact in fp32.
inline float __half2float(__half h) {
    const unsigned sign = (h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
    if (exp == 0) return __uint_as_float(sign | __float_as_uint((float)man * 0x1p-24f));
    return __uint_as_float(sign | (exp == 0x1f ? 0x7f800000u : (exp + 112u) << 23) | man << 13);
}
inline __half __float2half_rn(float f) {
    const _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.x, &v, 2);
    return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }
inline __half::operator float() const { return __half2float(*this); }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
struct __half2 {
    __half x, y;
};
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline float __expf(float x) { return std::exp(x); }  // the GPU's fast approximations, exact here
inline float __logf(float x) { return std::log(x); }

namespace emu {

enum State { RUNNABLE, CTA_WAIT, WARP_WAIT, NAMED_WAIT, WG_WAIT, DONE };

// Switching between the scheduler and a thread. On x86-64 a switch is emu_swap_stack: push the callee-saved
// registers, swap stack pointers, pop; a thread starts by "returning" into entry() from a stack laid out as a
// switch would leave it. Not _longjmp: AddressSanitizer intercepts it to unpoison the stack it leaves (a
// sigaltstack system call and a shadow write per switch, measured at a third of an emulation's time), which a
// coroutine switch does not need, since no frame is abandoned: every thread resumes where it switched out and
// its stack is unpoisoned whole before each CTA. Elsewhere a thread starts through setcontext (once per CTA)
// and every switch after that is a _setjmp / _longjmp pair, which, unlike swapcontext, makes no system call.
#if defined(__x86_64__) && !defined(EMU_NO_STACK_SWAP)  // EMU_NO_STACK_SWAP: the other path, for its tests
#define EMU_STACK_SWAP 1
extern "C" void emu_swap_stack(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".weak emu_swap_stack\n"
    ".type emu_swap_stack, @function\n"
    "emu_swap_stack:\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
    "    ret\n"
    ".size emu_swap_stack, .-emu_swap_stack\n");
#endif
struct Copy {
    void* dst;
    const void* src;
    size_t bytes = 16;
};

// A bulk reduction (cp.reduce.async.bulk .add of f32, bf16 or f16 values) in flight: its source as it was at the issue.
struct Bulk {
    void* dst;
    const unsigned char* src;
    std::vector<unsigned char> at_issue;
    int kind;  // 0: f32, 1: bf16, 2: f16
};

// A tensor-map copy pending on an mbarrier, and an mbarrier's state (the CTA's, by its address).
struct Tma {
    void* dst;
    moba_tensor_map map;
    long long c0, c1;
};
struct Mbar {
    unsigned count = 0, arrived = 0, phase = 0;
    long long tx = 0;  // bytes announced minus bytes landed in the current phase
    std::vector<Tma> pending;
};
inline std::map<const void*, Mbar>& mbars() {
    static std::map<const void*, Mbar> m;
    return m;
}

struct Thread {
#ifdef EMU_STACK_SWAP
    void* sp = nullptr;  // the stack pointer it switched out at
#else
    ucontext_t ctx;
#endif
    std::vector<Copy> open;                // cp.async issued since the last commit
    std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
    std::vector<Bulk> bulk_open;                 // bulk reductions issued since the last bulk commit
    std::vector<std::vector<Bulk>> bulk_groups;  // committed bulk groups, oldest first
#ifndef EMU_STACK_SWAP
    jmp_buf jb;
    bool started = false;
#endif
    std::vector<char> stack;
    dim3 idx;
    State state = RUNNABLE;
    unsigned phase = 0;  // warp operations done (selects the exchange bank)
    int bar = 0;         // NAMED_WAIT: the named barrier (1..15) and the thread count it waits for
    unsigned bar_n = 0;
};

inline constexpr size_t kStack = 256 * 1024;

struct Cta {
    std::vector<Thread> threads;
    std::vector<unsigned> slots;  // two banks of one 32-bit exchange slot per thread (warp operations)
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::vector<unsigned> tickets;  // the order of the work tickets of this launch (empty: not drawn yet)
    int current = -1;
#ifdef EMU_STACK_SWAP
    void* sched_sp = nullptr;
#else
    jmp_buf sched;
#endif
    std::function<void()> body;
    std::mt19937 rng;
    unsigned arrived[16] = {};  // bar.arrive arrivals at each named barrier in its current phase
    unsigned arrive_n[16] = {};  // the thread count they named
#ifdef EMU_ASAN
    void* fake_stack = nullptr;
    const void* main_bottom = nullptr;  // the scheduler's stack, learnt at the first switch into a thread
    size_t main_size = 0;
#endif
};

inline Cta& cta() {
    static Cta c;
    return c;
}
inline dim3& block_idx() {
    static dim3 d;
    return d;
}
inline dim3& grid_dim() {
    static dim3 d;
    return d;
}
inline dim3& block_dim() {
    static dim3 d;
    return d;
}
inline unsigned char* dynamic_smem() { return cta().smem; }

// Switch from the running thread back to the scheduler, with `s` as the thread's new state.
inline void yield(State s) {
    Cta& c = cta();
    Thread& t = c.threads[c.current];
    t.state = s;
#ifdef EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, c.main_bottom, c.main_size);
#endif
#ifdef EMU_STACK_SWAP
    emu_swap_stack(&t.sp, c.sched_sp);
#else
    if (!_setjmp(t.jb)) _longjmp(c.sched, 1);
#endif
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &c.main_bottom, &c.main_size);
#endif
}

inline void entry() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &cta().main_bottom, &cta().main_size);
#endif
    cta().body();
    Cta& c = cta();
    c.threads[c.current].state = DONE;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, c.main_bottom, c.main_size);  // this thread's stack is done
#endif
#ifdef EMU_STACK_SWAP
    void* done = nullptr;
    emu_swap_stack(&done, c.sched_sp);
#else
    _longjmp(c.sched, 1);
#endif
}

#ifdef EMU_STACK_SWAP
// A new thread's stack pointer: below the top, entry's (never used) return address, the address emu_swap_stack
// returns to (entry, entered with the stack aligned as after a call) and six zero callee-saved registers.
inline void* start_sp(std::vector<char>& stack) {
    const uintptr_t top = (reinterpret_cast<uintptr_t>(stack.data()) + stack.size()) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&entry);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;
    return sp;
}
#endif

inline void fail(const std::string& msg) {
    std::fprintf(stderr, "emulation error: %s (block %u %u %u)\n", msg.c_str(), block_idx().x, block_idx().y,
                 block_idx().z);
    std::fflush(stderr);
    std::_Exit(3);  // not exit(): its handlers, run from a thread's coroutine stack, can hang
}

// bar.sync id, n: wait until n threads (whole warps) have come to barrier id (1..15; 0 is __syncthreads): waiting
// there, or passed it by bar.arrive (named_arrive) in its current phase.
inline void named_barrier(int id, unsigned n) {
    if (id < 1 || id > 15 || n == 0 || n % 32) fail("named barrier id 1..15 and a count of whole warps");
    Thread& t = cta().threads[cta().current];
    t.bar = id;
    t.bar_n = n;
    yield(NAMED_WAIT);
}

// The threads come to named barrier `id` in its current phase (waiting there or arrived by bar.arrive), or -1
// when one of them names a count other than `n`.
inline long named_come(const Cta& c, int id, unsigned n) {
    if (c.arrived[id] && c.arrive_n[id] != n) return -1;
    long come = c.arrived[id];
    for (const auto& u : c.threads)
        if (u.state == NAMED_WAIT && u.bar == id) {
            if (u.bar_n != n) return -1;
            ++come;
        }
    return come;
}

// Whether named barrier `id`'s phase is complete (n threads waiting or arrived); if so its waiting threads run
// again and the next phase begins.
inline bool release_named(Cta& c, int id, unsigned n) {
    const long have = named_come(c, id, n);
    if (have < 0) fail("threads come to one named barrier with different counts");
    if (have > (long)n) fail("more threads at a named barrier than its count");
    if (have < (long)n) return false;
    for (auto& u : c.threads)
        if (u.state == NAMED_WAIT && u.bar == id) u.state = RUNNABLE;
    c.arrived[id] = 0;
    return true;
}

// bar.arrive id, n: count this thread at barrier id without waiting; the phase completes when n threads have come.
inline void named_arrive(int id, unsigned n) {
    if (id < 1 || id > 15 || n == 0 || n % 32) fail("named barrier id 1..15 and a count of whole warps");
    Cta& c = cta();
    if (named_come(c, id, n) < 0) fail("threads come to one named barrier with different counts");
    c.arrive_n[id] = n;
    ++c.arrived[id];
    release_named(c, id, n);
}

// Wait until all 128 threads of the running thread's warpgroup (threads 128 g .. 128 g + 127 of the CTA) wait
// here: the meeting of a .sync.aligned warpgroup instruction's model. Apart from __syncthreads and the named
// barriers; a warpgroup some of whose threads have returned stops the run.
inline void warpgroup_barrier() {
    if (cta().threads.size() % 128) fail("a warpgroup operation in a block that is not whole warpgroups");
    yield(WG_WAIT);
}

// Thread i has just stopped at a named barrier or a warpgroup meeting: when it is the last thread that barrier
// waits for, release it now on a coin flip (true: released). Otherwise it is released when no thread can run, after
// every other thread has gone as far as it can; at once, its threads may run ahead of threads that have not yet
// reached their next synchronisation point (on a GPU either can happen). So a consumer behind a barrier of its own
// (one warpgroup's named barrier or wgmma wait) can run before a producer that is missing the barrier both should
// pass. Barriers of every other kind, and a named barrier whose threads name different counts (an error, reported
// when no thread can run), wait until no thread can run.
inline bool release_at_once(Cta& c, int i) {
    const Thread& t = c.threads[i];
    if (t.state == NAMED_WAIT) {  // differing counts are reported once no thread can run
        if (named_come(c, t.bar, t.bar_n) != (long)t.bar_n || (c.rng() & 1u)) return false;
        return release_named(c, t.bar, t.bar_n);
    }
    if (t.state == WG_WAIT && c.threads.size() % 128 == 0) {
        const size_t g0 = static_cast<size_t>(i) / 128 * 128;
        for (size_t j = g0; j < g0 + 128; ++j)
            if (c.threads[j].state != WG_WAIT) return false;
        if (c.rng() & 1u) return false;
        for (size_t j = g0; j < g0 + 128; ++j) c.threads[j].state = RUNNABLE;
        return true;
    }
    return false;
}

// Run one CTA to completion.
inline void run_cta(unsigned nthreads, size_t smem_bytes) {
    Cta& c = cta();
    if (nthreads % 32) fail("block size must be a multiple of 32");
    if (c.threads.size() != nthreads) {
        c.threads = std::vector<Thread>(nthreads);
        for (auto& t : c.threads) t.stack.resize(kStack);
    }
    c.slots.assign(2 * nthreads, 0u);
    void* smem = nullptr;
    if (posix_memalign(&smem, 1024, smem_bytes ? smem_bytes : 1) != 0) fail("cannot allocate shared memory");
    c.smem = static_cast<unsigned char*>(smem);
    c.smem_bytes = smem_bytes;
    std::memset(c.smem, 0xff, smem_bytes);
    for (unsigned i = 0; i < nthreads; ++i) {
        Thread& t = c.threads[i];
        t.idx = {i % block_dim().x, (i / block_dim().x) % block_dim().y, i / (block_dim().x * block_dim().y)};
        t.open.clear();
        t.groups.clear();
        t.bulk_open.clear();
        t.bulk_groups.clear();
        t.state = RUNNABLE;
        t.phase = 0;
#ifdef EMU_ASAN
        __asan_unpoison_memory_region(t.stack.data(), t.stack.size());  // frames left by the last CTA
#endif
#ifdef EMU_STACK_SWAP
        t.sp = start_sp(t.stack);
#else
        t.started = false;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = t.stack.data();
        t.ctx.uc_stack.ss_size = t.stack.size();
        t.ctx.uc_link = nullptr;
        makecontext(&t.ctx, entry, 0);
#endif
    }
    for (int id = 0; id < 16; ++id) c.arrived[id] = c.arrive_n[id] = 0;
    std::vector<int> order(nthreads);
    for (unsigned i = 0; i < nthreads; ++i) order[i] = (int)i;
    const unsigned warps = nthreads / 32;
    for (;;) {
        std::shuffle(order.begin(), order.end(), c.rng);
        bool ran = false;
        for (int i : order) {
            if (c.threads[i].state != RUNNABLE) continue;
            ran = true;
            c.current = i;
#ifdef EMU_ASAN
            Thread& t = c.threads[i];
            __sanitizer_start_switch_fiber(&c.fake_stack, t.stack.data(), t.stack.size());
#endif
#ifdef EMU_STACK_SWAP
            emu_swap_stack(&c.sched_sp, c.threads[i].sp);
#else
            if (!_setjmp(c.sched)) {
                Thread& th = c.threads[i];
                if (!th.started) {
                    th.started = true;
                    setcontext(&th.ctx);
                }
                _longjmp(th.jb, 1);
            }
#endif
#ifdef EMU_ASAN
            __sanitizer_finish_switch_fiber(c.fake_stack, nullptr, nullptr);
#endif
            if (release_at_once(c, i)) break;  // a new shuffled round, in which the released threads may run first
        }
        if (ran) continue;
        // Nobody can run: release a completed barrier, or finish, or report a deadlock.
        bool all_done = true, released = false;
        unsigned live = 0, at_cta = 0;
        for (auto& t : c.threads) {
            if (t.state != DONE) {
                all_done = false;
                ++live;
            }
            if (t.state == CTA_WAIT) ++at_cta;
        }
        if (all_done) break;
        for (unsigned w = 0; w < warps; ++w) {
            unsigned waiting = 0, alive = 0;
            for (unsigned l = 0; l < 32; ++l) {
                const State s = c.threads[w * 32 + l].state;
                if (s != DONE) ++alive;
                if (s == WARP_WAIT) ++waiting;
            }
            if (waiting && waiting == alive) {
                for (unsigned l = 0; l < 32; ++l)
                    if (c.threads[w * 32 + l].state == WARP_WAIT) c.threads[w * 32 + l].state = RUNNABLE;
                released = true;
            } else if (waiting) {
                fail("warp operation reached by only part of a warp (divergent shuffle / __syncwarp)");
            }
        }
        if (released) continue;
        // Named barriers (bar.sync id, n): released when n threads wait at id or arrived there (bar.arrive), all
        // naming the same n.
        for (int id = 1; id < 16; ++id) {
            unsigned n = 0;
            for (auto& t : c.threads)
                if (t.state == NAMED_WAIT && t.bar == id) n = t.bar_n;
            if (n && release_named(c, id, n)) released = true;
        }
        if (released) continue;
        // Warpgroup meetings: released when all 128 threads of the warpgroup wait there.
        for (unsigned g = 0; nthreads % 128 == 0 && g < nthreads / 128; ++g) {
            unsigned waiting = 0, alive = 0;
            for (unsigned i = 128 * g; i < 128 * g + 128; ++i) {
                if (c.threads[i].state != DONE) ++alive;
                if (c.threads[i].state == WG_WAIT) ++waiting;
            }
            if (waiting == 128) {
                for (unsigned i = 128 * g; i < 128 * g + 128; ++i) c.threads[i].state = RUNNABLE;
                released = true;
            } else if (waiting && waiting == alive) {
                fail("a warpgroup operation (wgmma.wait_group) not reached by every thread of the warpgroup");
            }
        }
        if (released) continue;
        if (at_cta == live) {
            for (auto& t : c.threads)
                if (t.state == CTA_WAIT) t.state = RUNNABLE;
            continue;
        }
        fail("deadlock: __syncthreads not reached by every thread of the block");
    }
    for (auto& t : c.threads) {
        if (!t.open.empty() || !t.groups.empty()) fail("a thread ended with cp.async copies it never waited for");
        if (!t.bulk_open.empty() || !t.bulk_groups.empty())
            fail("a thread ended with bulk reductions it never waited for");
    }
    for (int id = 1; id < 16; ++id)
        if (c.arrived[id]) fail("a block ended with bar.arrive arrivals at a named barrier no thread waited at");
    for (auto& [bar, b] : mbars()) {
        (void)bar;
        if (!b.pending.empty()) fail("a block ended with tensor-map copies no thread waited for");
    }
    mbars().clear();
    std::free(c.smem);
    c.smem = nullptr;
}

// Launch: every CTA of the grid in a shuffled order; `kernel` is called by every thread.
inline void launch(dim3 grid, dim3 block, size_t smem, unsigned seed, std::function<void()> kernel) {
    grid_dim() = grid;
    block_dim() = block;
    cta().body = std::move(kernel);
    cta().rng.seed(seed);
    cta().tickets.clear();
    std::vector<dim3> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
    std::shuffle(blocks.begin(), blocks.end(), cta().rng);
    for (const dim3& b : blocks) {
        block_idx() = b;
        run_cta(block.x * block.y * block.z, smem);
    }
}

inline int lane() { return (int)(cta().current % 32); }
inline int warp_base() { return cta().current - lane(); }

// Lanes write a bank, wait for the warp, read; alternating banks means the next operation's writes cannot
// overwrite what a slower lane has still to read, so one switch per operation suffices.
inline unsigned* bank() {
    Cta& c = cta();
    return c.slots.data() + (c.threads[c.current].phase++ & 1u) * c.threads.size();
}

inline unsigned exchange(unsigned v, int src_lane) {
    Cta& c = cta();
    unsigned* slots = bank();
    slots[c.current] = v;
    yield(WARP_WAIT);
    return slots[warp_base() + src_lane];
}

// The ticket that raw counter value `raw` stands for: tickets [0, n_route) in a random order, then
// [n_route, n_total) in a random order; values beyond n_total stand for themselves.
inline unsigned ticket(unsigned raw, int n_route, int n_total) {
    Cta& c = cta();
    if (c.tickets.size() != (size_t)n_total) {
        c.tickets.resize(n_total);
        for (int i = 0; i < n_total; ++i) c.tickets[i] = (unsigned)i;
        std::shuffle(c.tickets.begin(), c.tickets.begin() + n_route, c.rng);
        std::shuffle(c.tickets.begin() + n_route, c.tickets.end(), c.rng);
    }
    return raw < (unsigned)n_total ? c.tickets[raw] : raw;
}

// Shared memory from byte `from` on back to 0xff (call from one thread between two barriers).
inline void poison_smem(size_t from) {
    Cta& c = cta();
    if (from < c.smem_bytes) std::memset(c.smem + from, 0xff, c.smem_bytes - from);
}

inline Thread& me() { return cta().threads[cta().current]; }

}  // namespace emu

#define threadIdx (emu::cta().threads[emu::cta().current].idx)
#define blockIdx (emu::block_idx())
#define gridDim (emu::grid_dim())
#define blockDim (emu::block_dim())
#define DEC_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()

inline void __syncthreads() { emu::yield(emu::CTA_WAIT); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    emu::bank();  // keep every lane's bank phase in step
    emu::yield(emu::WARP_WAIT);
}
inline void __threadfence() {}

inline void emu_full_mask(unsigned mask) {
    if (mask != 0xffffffffu) emu::fail("only full-warp masks are emulated");
}
inline float __shfl_xor_sync(unsigned mask, float v, int off) {
    emu_full_mask(mask);
    return __uint_as_float(emu::exchange(__float_as_uint(v), emu::lane() ^ off));
}
inline int __shfl_xor_sync(unsigned mask, int v, int off) {
    emu_full_mask(mask);
    return (int)emu::exchange((unsigned)v, emu::lane() ^ off);
}
inline int __shfl_sync(unsigned mask, int v, int src) {
    emu_full_mask(mask);
    return (int)emu::exchange((unsigned)v, src & 31);
}
inline float __shfl_sync(unsigned mask, float v, int src) {
    emu_full_mask(mask);
    return __uint_as_float(emu::exchange(__float_as_uint(v), src & 31));
}
inline int __shfl_up_sync(unsigned mask, int v, unsigned delta) {
    emu_full_mask(mask);
    const int src = emu::lane() - (int)delta;
    return (int)emu::exchange((unsigned)v, src < 0 ? emu::lane() : src);
}
inline float __shfl_up_sync(unsigned mask, float v, unsigned delta) {
    emu_full_mask(mask);
    const int src = emu::lane() - (int)delta;
    return __uint_as_float(emu::exchange(__float_as_uint(v), src < 0 ? emu::lane() : src));
}
inline long long __shfl_up_sync(unsigned mask, long long v, unsigned delta) {  // two 32-bit exchanges
    const unsigned lo = (unsigned)__shfl_up_sync(mask, (int)(unsigned long long)v, delta);
    const unsigned hi = (unsigned)__shfl_up_sync(mask, (int)((unsigned long long)v >> 32), delta);
    return (long long)(((unsigned long long)hi << 32) | lo);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    emu_full_mask(mask);
    emu::Cta& c = emu::cta();
    unsigned* slots = emu::bank();
    slots[c.current] = pred ? 1u : 0u;
    emu::yield(emu::WARP_WAIT);
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= slots[emu::warp_base() + l] << l;
    return bits;
}
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned atomicOr(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old | v;
    return old;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __any_sync(unsigned mask, int pred) {
    emu_full_mask(mask);
    emu::Cta& c = emu::cta();
    unsigned* slots = emu::bank();
    slots[c.current] = pred ? 1u : 0u;
    emu::yield(emu::WARP_WAIT);
    int any = 0;
    for (int l = 0; l < 32; ++l) any |= (int)slots[emu::warp_base() + l];
    return any;
}

// Coroutines of one CTA never run at the same time: a plain read-modify-write is atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}
inline int atomicCAS(int* p, int compare, int v) {
    const int old = *p;
    if (old == compare) *p = v;
    return old;
}
template <typename T>
inline T dec_ldcg(const T* p) {
    return *p;
}

inline void dec_cp_async16(void* smem, const void* gmem) {
    std::memset(smem, 0xff, 16);  // NaN until the copy lands
    emu::me().open.push_back({smem, gmem});
}
inline void dec_cp_async8(void* smem, const void* gmem) {
    std::memset(smem, 0xff, 8);
    emu::me().open.push_back({smem, gmem, 8});
}
namespace emu {
// A thread's asynchronous operations in commit groups (cp.async, bulk reductions): commit closes the open group;
// wait lands every group but the newest n, oldest first.
template <typename Op>
inline void commit_group(std::vector<Op>& open, std::vector<std::vector<Op>>& groups) {
    groups.push_back(std::move(open));
    open.clear();
}
template <typename Op, typename Land>
inline void wait_groups(std::vector<std::vector<Op>>& groups, int n, Land land) {
    while (groups.size() > (size_t)n) {
        for (const Op& op : groups.front()) land(op);
        groups.erase(groups.begin());
    }
}
}  // namespace emu
inline void dec_cp_async_commit() {
    emu::Thread& t = emu::me();
    emu::commit_group(t.open, t.groups);
}
inline void dec_cp_async_wait_n(int n) {
    emu::wait_groups(emu::me().groups, n, [](const emu::Copy& c) { std::memcpy(c.dst, c.src, c.bytes); });
}
template <int N>
inline void dec_cp_async_wait() {
    dec_cp_async_wait_n(N);
}
// Bulk reductions (cp.reduce.async.bulk .add.f32 / .add.noftz.bf16 / .f16, shared -> global): the source is taken
// when the operation is issued, and must still hold the same bytes when its thread waits for the group (the copy
// engine may read it at any moment in between); the adds land at that wait, each 16-bit sum rounded to nearest even.
// So a source written after the issue, or rewritten before the wait, stops the run or shows in the sums.
inline void dec_bulk_reduce_add(void* dst, const unsigned char* src, unsigned bytes, int kind) {
    if (bytes == 0 || bytes % 16 || reinterpret_cast<uintptr_t>(dst) % 16)
        emu::fail("a bulk reduction of a size that is not a multiple of 16 bytes, or to an unaligned address");
    emu::me().bulk_open.push_back({dst, src, std::vector<unsigned char>(src, src + bytes), kind});
}
inline void dec_bulk_reduce_add_f32(float* dst, const unsigned char* src, unsigned bytes) {
    dec_bulk_reduce_add(dst, src, bytes, 0);
}
inline void dec_bulk_reduce_add_16(__nv_bfloat16* dst, const unsigned char* src, unsigned bytes) {
    dec_bulk_reduce_add(dst, src, bytes, 1);
}
inline void dec_bulk_reduce_add_16(__half* dst, const unsigned char* src, unsigned bytes) {
    dec_bulk_reduce_add(dst, src, bytes, 2);
}
inline void dec_bulk_commit() {
    emu::Thread& t = emu::me();
    emu::commit_group(t.bulk_open, t.bulk_groups);
}
inline void dec_bulk_wait_n(int n) {
    emu::wait_groups(emu::me().bulk_groups, n, [](const emu::Bulk& b) {
        if (std::memcmp(b.src, b.at_issue.data(), b.at_issue.size()))
            emu::fail("the source of a bulk reduction changed before its thread waited for the read");
        const size_t n = b.at_issue.size() / (b.kind == 0 ? 4 : 2);
        for (size_t i = 0; i < n; ++i) {
            if (b.kind == 0) {
                float x;
                std::memcpy(&x, b.at_issue.data() + 4 * i, 4);
                static_cast<float*>(b.dst)[i] += x;
            } else if (b.kind == 1) {
                __nv_bfloat16 x, *d = static_cast<__nv_bfloat16*>(b.dst) + i;
                std::memcpy(&x, b.at_issue.data() + 2 * i, 2);
                *d = __float2bfloat16_rn(__bfloat162float(*d) + __bfloat162float(x));
            } else {
                __half x, *d = static_cast<__half*>(b.dst) + i;
                std::memcpy(&x, b.at_issue.data() + 2 * i, 2);
                *d = __float2half_rn(__half2float(*d) + __half2float(x));
            }
        }
    });
}
// Tensor-map copies on mbarriers (decode_common.cuh).
namespace emu {
inline Mbar& mbar(const void* bar) {
    auto it = mbars().find(bar);
    if (it == mbars().end()) fail("an mbarrier used before its init");
    return it->second;
}
// The box at (c0, c1) of `m` into dst as the copy engine writes it: 16-byte chunk x of box row r at chunk x ^ (r & 7)
// of that 128-byte row; elements outside the tensor are zeros. Returns the bytes written.
inline long long land(const Tma& t) {
    const moba_tensor_map& m = t.map;
    unsigned char* dst = static_cast<unsigned char*>(t.dst);
    for (long long r = 0; r < m.box_rows; ++r) {
        for (long long x = 0; x < m.box_cols / 8; ++x) {
            unsigned char* d = dst + r * 128 + ((x ^ (r & 7)) << 4);
            const long long row = t.c1 + r, col = t.c0 + 8 * x;
            if (row >= 0 && row < m.rows && col >= 0 && col + 8 <= m.cols)
                std::memcpy(d, m.base + (row * m.cols + col) * 2, 16);
            else
                std::memset(d, 0, 16);
        }
    }
    return m.box_rows * m.box_cols * 2;
}
}  // namespace emu
inline void dec_mbar_init(unsigned long long* bar, unsigned count) { emu::mbars()[bar] = emu::Mbar{count}; }
inline void dec_mbar_arrive_tx(unsigned long long* bar, unsigned bytes) {
    emu::Mbar& b = emu::mbar(bar);
    if (b.arrived == b.count) emu::fail("an mbarrier arrival beyond its count in one phase");
    ++b.arrived;
    b.tx += bytes;
}
inline void dec_tma_load_2d(void* smem, const moba_tensor_map* map, int c0, int c1, unsigned long long* bar) {
    if (map->box_cols * 2 != 128) emu::fail("a tensor-map copy with the 128-byte swizzle needs 128-byte box rows");
    if ((static_cast<unsigned char*>(smem) - emu::cta().smem) % 1024)
        emu::fail("a tensor-map copy with the 128-byte swizzle into shared memory that is not 1 KB-aligned");
    std::memset(smem, 0xff, (size_t)(map->box_rows * 128));  // NaN until the copy lands
    emu::mbar(bar).pending.push_back({smem, *map, c0, c1});
}
inline void dec_mbar_wait(unsigned long long* bar, unsigned parity) {
    for (long spins = 0;; ++spins) {
        emu::Mbar& b = emu::mbar(bar);
        if ((b.phase & 1u) != parity) return;  // the phase of this parity has completed
        if (b.arrived == b.count) {
            for (const emu::Tma& t : b.pending) b.tx -= emu::land(t);
            b.pending.clear();
            if (b.tx != 0) emu::fail("an mbarrier phase whose copies landed other bytes than its arrivals announced");
            b.arrived = 0;
            ++b.phase;
            return;
        }
        if (spins > 1000000L) emu::fail("an mbarrier wait whose phase never completes");
        emu::yield(emu::RUNNABLE);
    }
}
inline void dec_fence_proxy_async() {}
inline unsigned dec_ld_acquire(const unsigned* p) { return *p; }
inline unsigned dec_fetch_ticket(unsigned* ticket, int n_route, int n_total) {
    return emu::ticket(atomicAdd(ticket, 1u), n_route, n_total);
}
inline void dec_wait_at_least(const unsigned* p, unsigned target) {
    if (*p < target) emu::fail("an attention unit waits for a routing counter that no earlier item raised");
}
#define DEC_EMU_ITEM_START()                                   \
    do {                                                       \
        if (threadIdx.x == 0) emu::poison_smem(DEC_FLAGS);     \
        __syncthreads();                                       \
    } while (0)
