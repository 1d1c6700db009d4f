// Shared-memory barrier objects (mbarrier) and the warpgroup register re-allocation of sm_90a, the
// synchronisation of a warp-specialised kernel (cuda/attention_wgmma.cuh, attn_wgmma_ws): producers and
// consumers hand buffers to each other through "full" and "empty" mbarriers instead of CTA-wide barriers.
//
// Sources: NVIDIA's PTX ISA (8.x), sections
//   * "Parallel Synchronization and Communication Instructions: mbarrier": an mbarrier is a 64-bit object in
//     shared memory with an expected arrival count (set by mbarrier.init) and a phase. A phase completes when
//     the pending count reaches zero; the object then moves to the next phase with the count reloaded.
//     mbarrier.arrive has .release semantics at CTA scope by default; mbarrier.try_wait.parity (sm_90) has
//     .acquire semantics at CTA scope by default and returns true once the phase of the given parity has
//     completed: parity 0 waits for phase 0, 2, ..., parity 1 for phase 1, 3, ... (a waiter asks for the
//     parity of phase k, k & 1, and must not fall two phases behind, which the pipeline's handshakes rule out).
//   * "cp.async.mbarrier.arrive": the mbarrier tracks all prior cp.async operations of the executing thread and
//     an arrive-on operation is triggered when they complete; with .noinc the pending count is not incremented
//     first, so that arrival counts against the count given to mbarrier.init. cp.async writes shared memory in
//     the generic proxy, while wgmma reads its operands through the async proxy: the consumer, after its
//     acquiring wait, issues fence.proxy.async.shared::cta ("Memory Consistency Model", "Proxies") before the
//     wgmma that reads the data.
//   * "setmaxnreg": setmaxnreg.{inc,dec}.sync.aligned.u32 N (sm_90a) sets the per-thread register maximum of
//     the executing warpgroup to N (24 .. 256, a multiple of 8); every warp of the warpgroup executes the same
//     instruction; .inc blocks until the CTA's pool has the registers, which .dec of another warpgroup returns.
#ifndef MOBALAB_MBARRIER_CUH
#define MOBALAB_MBARRIER_CUH

#include "ptx.cuh"

namespace moba {

// Expected arrival count `count`, phase 0. A CTA-wide barrier must follow before other threads use it.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival (release: this thread's prior writes are visible to a thread whose wait sees the phase complete).
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}

// One arrival that also announces `bytes` of bulk copies to land in this phase (mbarrier::complete_tx): the phase
// completes when its arrivals have come and those bytes have landed.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// One arrival, triggered when every cp.async this thread issued so far has completed (counted in the init count).
__device__ __forceinline__ void mbar_arrive_cp_async(unsigned bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Cycles a wait may take before the kernel traps: ~10 s at H200 clocks, far beyond any legitimate wait (a whole
// forward takes milliseconds), so a pipeline bug surfaces as a launch failure instead of a hung GPU.
#define MOBA_MBAR_TRAP_CYCLES 20000000000LL

// Block until the phase of parity `parity` has completed (acquire).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done;
  long long start = -1;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (!done) {
      const long long now = clock64();
      if (start < 0) start = now;
      else if (now - start > MOBA_MBAR_TRAP_CYCLES) __trap();
    }
  } while (!done);
}

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg count");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg count");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

}  // namespace moba

#endif  // MOBALAB_MBARRIER_CUH
