// Runs the launches of one MoBA decode step of the three-launch path (cuda/decode_split.cu) on the host, for
// tests without a GPU.
//
//   decode_split_harness MANIFEST
//
// MANIFEST: the launch manifest of harness_io.h.
#include "harness_io.h"
#include "ptx_host_model.h"

#include "decode_split_kernels.cu"

namespace {

using harness::Arg;
using harness::I;
using harness::P;

#define SCORE(NAME, T)                                                                                          \
    {#NAME, {14, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const float>(a[1]), P<const int>(a[2]), P<float>(a[3]), I(a[4]), I(a[5]),     \
              I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]), I(a[13]));                      \
     }}}
#define SCORE_TOPS(NAME, T)                                                                                     \
    {#NAME, {17, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const float>(a[1]), P<const int>(a[2]), P<float>(a[3]), I(a[4]), I(a[5]),     \
              I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), I(a[12]), I(a[13]), P<float>(a[14]),      \
              I(a[15]), P<unsigned>(a[16]));                                                                     \
     }}}
#define ATTEND(NAME, T)                                                                                         \
    {#NAME, {25, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const int>(a[3]), P<const int>(a[4]),      \
              P<int>(a[5]), P<float>(a[6]), P<float>(a[7]), P<unsigned>(a[8]), P<T>(a[9]), P<float>(a[10]),     \
              I(a[11]), I(a[12]), I(a[13]), I(a[14]), I(a[15]), I(a[16]), I(a[17]), I(a[18]), I(a[19]), I(a[20]), \
              I(a[21]), a[22].f, a[23].tm, a[24].tm);                                                            \
     }}}
#define ATTEND_SELECT(NAME, T)                                                                                  \
    {#NAME, {30, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const int>(a[3]), P<int>(a[4]),            \
              P<int>(a[5]), P<float>(a[6]), P<float>(a[7]), P<unsigned>(a[8]), P<T>(a[9]), P<float>(a[10]),     \
              I(a[11]), I(a[12]), I(a[13]), I(a[14]), I(a[15]), I(a[16]), I(a[17]), I(a[18]), I(a[19]), I(a[20]), \
              a[21].f, P<const float>(a[22]), P<const float>(a[23]), I(a[24]), I(a[25]), P<unsigned>(a[26]),     \
              I(a[27]), a[28].tm, a[29].tm);                                                                     \
     }}}
#define ATTEND_PAGED(NAME, T)                                                                                   \
    {#NAME, {27, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const int>(a[3]), P<const int>(a[4]),      \
              P<int>(a[5]), P<float>(a[6]), P<float>(a[7]), P<unsigned>(a[8]), P<T>(a[9]), P<float>(a[10]),     \
              I(a[11]), I(a[12]), I(a[13]), I(a[14]), I(a[15]), I(a[16]), I(a[17]), I(a[18]), I(a[19]), I(a[20]), \
              a[21].f, P<const int>(a[22]), I(a[23]), I(a[24]), a[25].tm, a[26].tm);                            \
     }}}
#define ATTEND_PAGED_SELECT(NAME, T)                                                                            \
    {#NAME, {32, [](const std::vector<Arg>& a) {                                                                \
         NAME(P<const T>(a[0]), P<const T>(a[1]), P<const T>(a[2]), P<const int>(a[3]), P<int>(a[4]),            \
              P<int>(a[5]), P<float>(a[6]), P<float>(a[7]), P<unsigned>(a[8]), P<T>(a[9]), P<float>(a[10]),     \
              I(a[11]), I(a[12]), I(a[13]), I(a[14]), I(a[15]), I(a[16]), I(a[17]), I(a[18]), I(a[19]), a[20].f, \
              P<const float>(a[21]), P<const float>(a[22]), I(a[23]), I(a[24]), P<unsigned>(a[25]), I(a[26]),   \
              P<const int>(a[27]), I(a[28]), I(a[29]), a[30].tm, a[31].tm);                                      \
     }}}
#define EACH_TYPE(KIND, NAME)                                                                                   \
    KIND(NAME##_bf16_d64, __nv_bfloat16), KIND(NAME##_bf16_d128, __nv_bfloat16), KIND(NAME##_fp16_d64, __half), \
        KIND(NAME##_fp16_d128, __half)

const harness::Kernels kKernels = {
    EACH_TYPE(SCORE, moba_decode_route_score),
    EACH_TYPE(SCORE_TOPS, moba_decode_route_score_tops),
    {"moba_decode_route_select", {12, [](const std::vector<Arg>& a) {
         moba_decode_route_select(P<const float>(a[0]), P<const int>(a[1]), P<int>(a[2]), P<int>(a[3]), I(a[4]),
                                  I(a[5]), I(a[6]), I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]));
     }}},
    EACH_TYPE(ATTEND, moba_decode_attend),
    EACH_TYPE(ATTEND_SELECT, moba_decode_attend_select),
    EACH_TYPE(ATTEND_PAGED, moba_decode_attend_paged),
    EACH_TYPE(ATTEND_PAGED_SELECT, moba_decode_attend_paged_select),
};

}  // namespace

int main(int argc, char** argv) { return harness::run_manifest("decode_split_harness", argc, argv, kKernels); }
