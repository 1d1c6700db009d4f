// Probes of cuda_host.h itself, for tests/kernels/test_cuda_host.py: the kernel named on the command line runs on
// three CTAs of 64 threads.
//
//   cuda_host_probe KERNEL
//
// "exchange" (each thread reads what its neighbour wrote to shared memory before a barrier, and a value handed
// round the warp by shuffles; prints "ok" and the switch path when every value is right) must pass; the others
// must stop the run with the error they name: a read past a stack array or a heap array of an emulated thread
// (AddressSanitizer), half a warp at __syncwarp while the other half waits at __syncthreads, a cp.async never waited
// for. "handover" (a warp that stages values in shared memory, round after round, and a warp that adds them to
// global memory by bulk reductions, the two handing the buffer back and forth by bar.arrive / bar.sync, as the wgmma
// backward's dQ warpgroup does) must pass; a bulk reduction whose source is rewritten before its thread waits for
// the read, one never waited for, and a bar.arrive no thread waits for must stop the run.
#include "cuda_host.h"

namespace {

__attribute__((noinline)) int index_of(int i) { return i; }  // an out-of-bounds index the compiler cannot see

int out[3 * 64];
float sums[3 * 32];

void exchange() {
    int* s = reinterpret_cast<int*>(emu::dynamic_smem());
    const int t = (int)threadIdx.x, b = (int)blockIdx.x;
    s[t] = 7 * t + b;
    __syncthreads();
    const int got = __shfl_xor_sync(0xffffffffu, s[(t + 1) % 64], 1);  // thread t ^ 1's read
    out[b * 64 + t] = got - (7 * (((t ^ 1) + 1) % 64) + b);
}

void stack_overflow() {
    int local[8];
    for (int i = 0; i < 8; ++i) local[i] = i;
    __syncthreads();
    if (threadIdx.x == 5) {
        volatile int x = local[index_of(8)];
        (void)x;
    }
    __syncthreads();
}

void heap_overflow() {
    int* h = new int[4]();
    __syncthreads();
    if (threadIdx.x == 7) {
        volatile int x = h[index_of(4)];
        (void)x;
    }
    __syncthreads();
    delete[] h;
}

void divergent_warp() {
    if (threadIdx.x % 32 < 16)
        __syncwarp();
    else
        __syncthreads();
}

void cp_async_not_waited() {
    static const unsigned char src[16] = {};
    if (threadIdx.x == 3) {
        dec_cp_async16(emu::dynamic_smem(), src);
        dec_cp_async_commit();
    }
}

// Warp 0 stages 32 floats, round r's value 100 r + lane, and arrives at barrier 1 ("full"); warp 1 waits there,
// lane 0 adds the 128 bytes to this CTA's sums by one bulk reduction, and the warp hands the buffer back at barrier 2
// ("empty") once the read is done. Lane 0 of warp 1 checks the sums at the end.
void handover() {
    float* s = reinterpret_cast<float*>(emu::dynamic_smem());
    const int t = (int)threadIdx.x, b = (int)blockIdx.x, rounds = 3;
    for (int r = 0; r < rounds; ++r) {
        if (t < 32) {
            emu::named_barrier(2, 64);
            s[t] = 100.f * r + t;
            emu::named_arrive(1, 64);
        } else {
            if (r > 0) dec_bulk_wait_n(0);
            emu::named_arrive(2, 64);
            emu::named_barrier(1, 64);
            if (t == 32) dec_bulk_reduce_add_f32(sums + 32 * b, reinterpret_cast<unsigned char*>(s), 128);
            dec_bulk_commit();
        }
    }
    if (t >= 32) dec_bulk_wait_n(0);
    if (t == 32)
        for (int i = 0; i < 32; ++i) out[64 * b + i] = (int)sums[32 * b + i] - (300 + 3 * i);
}

void bulk_source_rewritten() {
    float* s = reinterpret_cast<float*>(emu::dynamic_smem());
    if (threadIdx.x == 0) {
        s[0] = 1.f;
        dec_bulk_reduce_add_f32(sums + 32 * blockIdx.x, reinterpret_cast<unsigned char*>(s), 16);
        dec_bulk_commit();
        s[0] = 2.f;  // before the wait for the read
        dec_bulk_wait_n(0);
    }
}

void bulk_not_waited() {
    if (threadIdx.x == 0) {
        dec_bulk_reduce_add_f32(sums + 32 * blockIdx.x, emu::dynamic_smem(), 16);
        dec_bulk_commit();
    }
}

void arrival_unmatched() {
    if (threadIdx.x >= 32) emu::named_arrive(3, 64);
}

}  // namespace

int main(int argc, char** argv) {
    const std::map<std::string, void (*)()> kernels = {
        {"exchange", exchange}, {"stack_overflow", stack_overflow}, {"heap_overflow", heap_overflow},
        {"divergent_warp", divergent_warp}, {"cp_async_not_waited", cp_async_not_waited}, {"handover", handover},
        {"bulk_source_rewritten", bulk_source_rewritten}, {"bulk_not_waited", bulk_not_waited},
        {"arrival_unmatched", arrival_unmatched}};
    if (argc != 2 || !kernels.count(argv[1])) {
        std::fprintf(stderr, "usage: cuda_host_probe KERNEL\n");
        return 2;
    }
    emu::launch({3, 1, 1}, {64, 1, 1}, 64 * sizeof(int), 1, kernels.at(argv[1]));
    for (int v : out)
        if (v != 0) {
            std::fprintf(stderr, "wrong exchange: %d\n", v);
            return 1;
        }
#ifdef EMU_STACK_SWAP
    std::printf("ok stack-swap\n");
#else
    std::printf("ok setjmp\n");
#endif
    return 0;
}
