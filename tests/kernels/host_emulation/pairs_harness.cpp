// Runs launches of the pair-list kernels (cuda/pairs.cu) on the host, for tests without a GPU.
//
//   pairs_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h (pointers, null pointers "z:0" and ints).
#include "harness_io.h"

#define __shared__ static
#include "pairs_model.h"

#include "pairs_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

const harness::Kernels kKernels = {
    {"moba_pairs_count", {14, [](const std::vector<Arg>& a) {
         moba_pairs_count(P<const int>(a[0]), P<int>(a[1]), P<unsigned>(a[2]), I(a[3]), I(a[4]), I(a[5]), I(a[6]),
                          I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]), I(a[13]));
     }}},
    {"moba_pairs_count_wide", {14, [](const std::vector<Arg>& a) {
         moba_pairs_count_wide(P<const int>(a[0]), P<int>(a[1]), P<unsigned>(a[2]), I(a[3]), I(a[4]), I(a[5]),
                               I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]), I(a[13]));
     }}},
    {"moba_pairs_scan", {12, [](const std::vector<Arg>& a) {
         moba_pairs_scan(P<int>(a[0]), I(a[1]), I(a[2]), I(a[3]), P<int>(a[4]), P<unsigned>(a[5]),
                         P<long long>(a[6]), P<long long>(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]));
     }}},
    {"moba_pairs_scatter", {16, [](const std::vector<Arg>& a) {
         moba_pairs_scatter(P<const int>(a[0]), P<const int>(a[1]), P<const long long>(a[2]), P<long long>(a[3]),
                            P<int>(a[4]), I(a[5]), I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]),
                            I(a[13]), I(a[14]), I(a[15]));
     }}},
    {"moba_pairs_scatter_wide", {16, [](const std::vector<Arg>& a) {
         moba_pairs_scatter_wide(P<const int>(a[0]), P<const int>(a[1]), P<const long long>(a[2]),
                                 P<long long>(a[3]), P<int>(a[4]), I(a[5]), I(a[6]), I(a[7]), I(a[8]), I(a[9]),
                                 I(a[10]), I(a[11]), I(a[12]), I(a[13]), I(a[14]), I(a[15]));
     }}},
    {"moba_pairs_radix_count_lo", {15, [](const std::vector<Arg>& a) {
         moba_pairs_radix_count_lo(P<const int>(a[0]), P<int>(a[1]), P<int>(a[2]), P<unsigned>(a[3]), I(a[4]),
                                   I(a[5]), I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]),
                                   I(a[13]), I(a[14]));
     }}},
    {"moba_pairs_radix_scan", {11, [](const std::vector<Arg>& a) {
         moba_pairs_radix_scan(P<int>(a[0]), I(a[1]), I(a[2]), P<int>(a[3]), P<unsigned>(a[4]), P<const int>(a[5]),
                               I(a[6]), I(a[7]), I(a[8]), P<long long>(a[9]), P<long long>(a[10]));
     }}},
    {"moba_pairs_radix_scatter_lo", {16, [](const std::vector<Arg>& a) {
         moba_pairs_radix_scatter_lo(P<const int>(a[0]), P<const int>(a[1]), P<const int>(a[2]), P<int>(a[3]),
                                     P<int>(a[4]), I(a[5]), I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]),
                                     I(a[12]), I(a[13]), I(a[14]), I(a[15]));
     }}},
    {"moba_pairs_radix_count_hi", {7, [](const std::vector<Arg>& a) {
         moba_pairs_radix_count_hi(P<const int>(a[0]), I(a[1]), I(a[2]), I(a[3]), I(a[4]), P<int>(a[5]),
                                   P<int>(a[6]));
     }}},
    {"moba_pairs_radix_scatter_hi", {9, [](const std::vector<Arg>& a) {
         moba_pairs_radix_scatter_hi(P<const int>(a[0]), P<const int>(a[1]), P<const int>(a[2]), P<const int>(a[3]),
                                     P<long long>(a[4]), P<int>(a[5]), I(a[6]), I(a[7]), I(a[8]));
     }}},
    {"moba_pairs_gather", {6, [](const std::vector<Arg>& a) {
         moba_pairs_gather(P<const long long>(a[0]), P<const long long>(a[1]), P<const long long>(a[2]),
                           P<long long>(a[3]), I(a[4]), I(a[5]));
     }}},
    {"moba_pairs_longest_first", {4, [](const std::vector<Arg>& a) {
         moba_pairs_longest_first(P<const long long>(a[0]), I(a[1]), I(a[2]), P<int>(a[3]));
     }}},
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("pairs_harness", argc, argv, kKernels); }
