// Runs the launches of one MoBA decode step of the two-launch path (cuda/decode_split.cu) on the host, for
// tests without a GPU. Same manifest as decode_harness.cpp:
//
//   decode_split_harness MANIFEST
//
// MANIFEST (text): "seed S", "buffers N" then N lines "id nbytes in_path out_path", "launches M" then M lines
// "kernel gx gy gz bx by bz smem nargs arg...", each arg "p:id:offset" (a pointer into a buffer), "i:value"
// (int) or "f:bits" (float, its 32-bit pattern as an unsigned integer). Every buffer is read from in_path
// before the first launch and written to out_path after the last.
#include "cuda_host.h"

#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "decode_split_kernels.cu"

namespace {

struct Arg {
    unsigned char* p = nullptr;
    long long i = 0;
    float f = 0.f;
};

template <typename T>
T* P(const Arg& a) {
    return reinterpret_cast<T*>(a.p);
}
int I(const Arg& a) { return (int)a.i; }

using Kernel = void (*)(const std::vector<Arg>&);

#define ROUTE(NAME, T)                                                                                          \
    {#NAME, {17, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const float>(a[1]), P<const int>(a[2]), P<int>(a[3]), P<float>(a[4]),          \
              P<int>(a[5]), P<unsigned>(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]), I(a[13]), \
              I(a[14]), I(a[15]), I(a[16]));                                                                     \
     }}}
#define ATTEND(NAME, T)                                                                                         \
    {#NAME, {19, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const int>(a[3]), P<const int>(a[4]),      \
              P<float>(a[5]), P<float>(a[6]), P<unsigned>(a[7]), P<T>(a[8]), P<float>(a[9]), I(a[10]), I(a[11]), \
              I(a[12]), I(a[13]), I(a[14]), I(a[15]), I(a[16]), I(a[17]), a[18].f);                              \
     }}}

const std::map<std::string, std::pair<size_t, Kernel>> kKernels = {
    ROUTE(moba_decode_route_bf16_d64, __nv_bfloat16),
    ROUTE(moba_decode_route_bf16_d128, __nv_bfloat16),
    ROUTE(moba_decode_route_fp16_d64, __half),
    ROUTE(moba_decode_route_fp16_d128, __half),
    ATTEND(moba_decode_attend_bf16_d64, __nv_bfloat16),
    ATTEND(moba_decode_attend_bf16_d128, __nv_bfloat16),
    ATTEND(moba_decode_attend_fp16_d64, __half),
    ATTEND(moba_decode_attend_fp16_d128, __half),
};

[[noreturn]] void die(const std::string& msg) {
    std::cerr << "decode_split_harness: " << msg << "\n";
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) die("usage: decode_split_harness MANIFEST");
    std::ifstream in(argv[1]);
    std::string word;
    unsigned seed = 0;
    size_t n = 0;
    in >> word >> seed;
    if (word != "seed") die("manifest must start with 'seed'");
    in >> word >> n;
    if (word != "buffers") die("expected 'buffers'");
    std::map<int, std::vector<unsigned char>> bufs;
    std::map<int, std::string> outs;
    for (size_t b = 0; b < n; ++b) {
        int id;
        size_t bytes;
        std::string src, dst;
        in >> id >> bytes >> src >> dst;
        auto& buf = bufs[id];
        buf.resize(bytes);
        std::ifstream f(src, std::ios::binary);
        if (!f.read(reinterpret_cast<char*>(buf.data()), (std::streamsize)bytes)) die("cannot read " + src);
        outs[id] = dst;
    }
    size_t m = 0;
    in >> word >> m;
    if (word != "launches") die("expected 'launches'");
    for (size_t l = 0; l < m; ++l) {
        std::string name;
        dim3 grid, block;
        size_t smem, nargs;
        in >> name >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z >> smem >> nargs;
        auto k = kKernels.find(name);
        if (k == kKernels.end()) die("unknown kernel " + name);
        if (k->second.first != nargs) die(name + ": wrong argument count");
        std::vector<Arg> args(nargs);
        for (auto& a : args) {
            std::string tok;
            in >> tok;
            std::stringstream ss(tok.substr(2));
            if (tok[0] == 'p') {
                int id;
                char colon;
                size_t off;
                ss >> id >> colon >> off;
                if (!bufs.count(id) || off > bufs[id].size()) die("bad pointer " + tok);
                a.p = bufs[id].data() + off;
            } else if (tok[0] == 'i') {
                ss >> a.i;
            } else if (tok[0] == 'f') {
                unsigned long long bits;
                ss >> bits;
                a.f = __uint_as_float((unsigned)bits);
            } else {
                die("bad argument " + tok);
            }
        }
        const Kernel fn = k->second.second;
        emu::launch(grid, block, smem, seed + (unsigned)l, [fn, &args] { fn(args); });
    }
    for (auto& [id, buf] : bufs) {
        std::ofstream f(outs[id], std::ios::binary);
        f.write(reinterpret_cast<const char*>(buf.data()), (std::streamsize)buf.size());
    }
    return 0;
}
