// The plumbing of the host-emulation harnesses: buffer files, the launch manifest, and the loop that runs its
// launches through cuda_host.h. A harness lists its kernels (name -> argument count and a caller that unpacks
// the arguments) and hands them to run_manifest.
//
// MANIFEST (text): "seed S", "buffers N" then N lines "id nbytes in_path out_path", "launches M" then M lines
// "kernel gx gy gz bx by bz smem nargs arg...", each arg "p:id:offset" (a pointer into a buffer), "z:0" (a null
// pointer), "i:value" (int), "f:bits" (float, its 32-bit pattern as an unsigned integer) or
// "t:id:offset:rows:cols:box_rows:box_cols" (a tensor map over a buffer: cuda_host.h's model of one). Every buffer is read
// from in_path before the first launch and written to out_path after the last; launch l runs with seed S + l.
#pragma once

#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda_host.h"

namespace harness {

struct Arg {
    unsigned char* p = nullptr;
    long long i = 0;
    float f = 0.f;
    moba_tensor_map tm;
};

template <typename T>
T* P(const Arg& a) {
    return reinterpret_cast<T*>(a.p);
}
inline int I(const Arg& a) { return (int)a.i; }

using Kernel = void (*)(const std::vector<Arg>&);
// kernel name -> (argument count, caller)
using Kernels = std::map<std::string, std::pair<size_t, Kernel>>;

// Exit status 2 (3 is cuda_host.h's emulation error), the message prefixed with the harness' name.
[[noreturn]] inline void die(const std::string& tool, const std::string& msg) {
    std::cerr << tool << ": " << msg << "\n";
    std::exit(2);
}

// The first `bytes` bytes of a file (all of it when bytes < 0), in a vector of exactly that size, so that
// AddressSanitizer sees an access past its end.
inline std::vector<unsigned char> read_file(const std::string& tool, const std::string& path, long long bytes = -1) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) die(tool, "cannot read " + path);
    if (bytes < 0) bytes = (long long)f.tellg();
    f.seekg(0);
    std::vector<unsigned char> buf((size_t)bytes);
    if (!f.read(reinterpret_cast<char*>(buf.data()), (std::streamsize)bytes)) die(tool, "cannot read " + path);
    return buf;
}

inline void write_file(const std::string& path, const std::vector<unsigned char>& buf) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(buf.data()), (std::streamsize)buf.size());
}

// One manifest argument token into `a`; pointers must land inside their buffer (one past its end allowed).
inline void parse_arg(const std::string& tool, const std::string& tok, std::map<int, std::vector<unsigned char>>& bufs,
                      Arg& a) {
    std::stringstream ss(tok.size() > 2 ? tok.substr(2) : std::string());
    if (tok[0] == 'p') {
        int id;
        char colon;
        size_t off;
        ss >> id >> colon >> off;
        if (!bufs.count(id) || off > bufs[id].size()) die(tool, "bad pointer " + tok);
        a.p = bufs[id].data() + off;
    } else if (tok[0] == 'i') {
        ss >> a.i;
    } else if (tok[0] == 'f') {
        unsigned long long bits;
        ss >> bits;
        a.f = __uint_as_float((unsigned)bits);
    } else if (tok[0] == 't') {
        int id;
        char c;
        size_t off;
        moba_tensor_map& m = a.tm;
        ss >> id >> c >> off >> c >> m.rows >> c >> m.cols >> c >> m.box_rows >> c >> m.box_cols;
        if (!bufs.count(id) || off + (size_t)(m.rows * m.cols * 2) > bufs[id].size()) die(tool, "bad tensor map " + tok);
        m.base = bufs[id].data() + off;
    } else if (tok[0] != 'z') {
        die(tool, "bad argument " + tok);
    }
}

// main() of a manifest harness: `tool MANIFEST`.
inline int run_manifest(const std::string& tool, int argc, char** argv, const Kernels& kernels) {
    if (argc != 2) die(tool, "usage: " + tool + " MANIFEST");
    std::ifstream in(argv[1]);
    std::string word;
    unsigned seed = 0;
    size_t n = 0;
    in >> word >> seed;
    if (word != "seed") die(tool, "manifest must start with 'seed'");
    in >> word >> n;
    if (word != "buffers") die(tool, "expected 'buffers'");
    std::map<int, std::vector<unsigned char>> bufs;
    std::map<int, std::string> outs;
    for (size_t b = 0; b < n; ++b) {
        int id;
        size_t bytes;
        std::string src, dst;
        in >> id >> bytes >> src >> dst;
        bufs[id] = read_file(tool, src, (long long)bytes);
        outs[id] = dst;
    }
    size_t m = 0;
    in >> word >> m;
    if (word != "launches") die(tool, "expected 'launches'");
    for (size_t l = 0; l < m; ++l) {
        std::string name;
        dim3 grid, block;
        size_t smem, nargs;
        in >> name >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z >> smem >> nargs;
        auto k = kernels.find(name);
        if (k == kernels.end()) die(tool, "unknown kernel " + name);
        if (k->second.first != nargs) die(tool, name + ": wrong argument count");
        std::vector<Arg> args(nargs);
        for (auto& a : args) {
            std::string tok;
            in >> tok;
            parse_arg(tool, tok, bufs, a);
        }
        const Kernel fn = k->second.second;
        emu::launch(grid, block, smem, seed + (unsigned)l, [fn, &args] { fn(args); });
    }
    for (auto& [id, buf] : bufs) write_file(outs[id], buf);
    return 0;
}

}  // namespace harness
