// Runs launches of the pair-list kernels (cuda/pairs.cu) on the host, for tests without a GPU.
//
//   pairs_harness MANIFEST
//
// MANIFEST: the format of decode_harness.cpp ("seed S", "buffers N" + N lines "id nbytes in_path out_path",
// "launches M" + M lines "kernel gx gy gz bx by bz smem nargs arg..."), each arg "p:id:offset" (a pointer
// into a buffer), "z:0" (a null pointer) or "i:value" (int).
#include "cuda_host.h"

#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

// What cuda_host.h leaves out and pairs.cu uses: static shared arrays (the CTAs of a launch run one after
// another, so a static is one CTA's shared memory), dynamic shared memory, __match_any_sync.
#define __shared__ static
#define MOBA_PAIRS_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
inline unsigned __match_any_sync(unsigned mask, int v) {
    emu_full_mask(mask);
    emu::Cta& c = emu::cta();
    unsigned* slots = emu::bank();
    slots[c.current] = (unsigned)v;
    emu::yield(emu::WARP_WAIT);
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (slots[emu::warp_base() + l] == (unsigned)v ? 1u : 0u) << l;
    return bits;
}

#include "pairs_kernels.cu"

namespace {

struct Arg {
    unsigned char* p = nullptr;
    long long i = 0;
};

template <typename T>
T* P(const Arg& a) {
    return reinterpret_cast<T*>(a.p);
}
int I(const Arg& a) { return (int)a.i; }

using Kernel = void (*)(const std::vector<Arg>&);

const std::map<std::string, std::pair<size_t, Kernel>> kKernels = {
    {"moba_pairs_count", {12, [](const std::vector<Arg>& a) {
         moba_pairs_count(P<const int>(a[0]), P<int>(a[1]), I(a[2]), I(a[3]), I(a[4]), I(a[5]), I(a[6]), I(a[7]),
                          I(a[8]), I(a[9]), I(a[10]), I(a[11]));
     }}},
    {"moba_pairs_scan", {8, [](const std::vector<Arg>& a) {
         moba_pairs_scan(P<int>(a[0]), I(a[1]), I(a[2]), I(a[3]), P<int>(a[4]), P<unsigned>(a[5]),
                         P<long long>(a[6]), P<long long>(a[7]));
     }}},
    {"moba_pairs_scatter", {15, [](const std::vector<Arg>& a) {
         moba_pairs_scatter(P<const int>(a[0]), P<const int>(a[1]), P<const long long>(a[2]), P<long long>(a[3]),
                            P<int>(a[4]), I(a[5]), I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]),
                            I(a[13]), I(a[14]));
     }}},
};

[[noreturn]] void die(const std::string& msg) {
    std::cerr << "pairs_harness: " << msg << "\n";
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) die("usage: pairs_harness MANIFEST");
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
            } else if (tok[0] != 'z') {
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
