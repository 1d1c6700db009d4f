// The command line of the top-k harnesses (topk_mma_harness, topk_wgmma_harness) and their one launch:
//
//   HARNESS KERNEL GX GY GZ THREADS SMEM SEED Q HI LO OUT SEQLEN HEADS KV_HEADS BLOCK N_BLOCKS TOP_K Q_POS0
//
// Q, HI, LO: files with the raw 16-bit inputs (read); OUT: the int32 output file (read first, so that a poisoned
// buffer stays poisoned where nothing writes, then written back). Included after the kernel text: a harness
// lists its kernels as name -> TopkKernel<T> and may check each thread when its kernel returns (at_exit).
#pragma once

#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "harness_io.h"

namespace topk_harness {

template <typename T>
using TopkKernel = void (*)(const T*, const T*, const T*, int*, int, int, int, int, int, int, int);

template <typename T>
void call(void* fn, const std::vector<unsigned char>& q, const std::vector<unsigned char>& hi,
          const std::vector<unsigned char>& lo, std::vector<unsigned char>& out, const int* ints) {
    reinterpret_cast<TopkKernel<T>>(fn)(reinterpret_cast<const T*>(q.data()), reinterpret_cast<const T*>(hi.data()),
                                        reinterpret_cast<const T*>(lo.data()), reinterpret_cast<int*>(out.data()),
                                        ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6]);
}

inline int run(const std::string& tool, const std::map<std::string, void*>& kernels, int argc, char** argv,
               const std::function<void()>& at_exit = {}) {
    if (argc != 19)
        harness::die(tool, "usage: " + tool + " KERNEL GX GY GZ THREADS SMEM SEED Q HI LO OUT SEQLEN HEADS "
                           "KV_HEADS BLOCK N_BLOCKS TOP_K Q_POS0");
    const std::string name = argv[1];
    const auto it = kernels.find(name);
    if (it == kernels.end()) harness::die(tool, "unknown kernel " + name);
    const dim3 grid{(unsigned)std::atoi(argv[2]), (unsigned)std::atoi(argv[3]), (unsigned)std::atoi(argv[4])};
    const dim3 block{(unsigned)std::atoi(argv[5]), 1, 1};
    const size_t smem = std::strtoull(argv[6], nullptr, 10);
    const unsigned seed = (unsigned)std::atoi(argv[7]);
    std::vector<unsigned char> q = harness::read_file(tool, argv[8]), hi = harness::read_file(tool, argv[9]),
                               lo = harness::read_file(tool, argv[10]), out = harness::read_file(tool, argv[11]);
    int ints[7];
    for (int i = 0; i < 7; ++i) ints[i] = std::atoi(argv[12 + i]);
    const bool bf16 = name.find("_bf16_") != std::string::npos;
    void* fn = it->second;
    emu::launch(grid, block, smem, seed, [&] {
        if (bf16)
            call<__nv_bfloat16>(fn, q, hi, lo, out, ints);
        else
            call<__half>(fn, q, hi, lo, out, ints);
        if (at_exit) at_exit();
    });
    harness::write_file(argv[11], out);
    return 0;
}

}  // namespace topk_harness
