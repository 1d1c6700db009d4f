// What attention_harness models of ptx.cuh, included before the kernel text: ptx_host_model.h (ptx.cuh's text
// skipped: shared addresses, ldmatrix, mma.sync, the float constants and cp.async), the head dims EMU_HEAD_DIM_OK
// names (default all), the swizzle ptx.cuh's own swz_chunk / swz (ptx_swizzle.h, taken from ptx.cuh by the
// tests), the dynamic shared memory the launch's and static __shared__ arrays function-local statics (one CTA runs
// at a time, so every thread of it sees the same array); in namespace moba cp.async with a source size (0
// zero-fills) or an ignore-src predicate, the predicated 16-byte global store, st.shared, the vector fp32 atomic
// add as a plain add (the CTAs run one after another), and named barriers through cuda_host.h.
#pragma once

#include "cuda_host.h"
#include "ptx_host_model.h"
#ifndef EMU_HEAD_DIM_OK
#define EMU_HEAD_DIM_OK(d) 1  // the head dims to build (the tests name theirs)
#endif
#define MOBA_HAS_HEAD_DIM(d) EMU_HEAD_DIM_OK(d)
#define MOBA_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#define __shared__ static

namespace moba {

// With a source size: 16 copies, 0 zero-fills the 16 bytes without reading src (from a zero buffer that lives as
// long as the process, so the fill too lands only when the issuing thread waits); the kernels use no other size.
inline void cp_async16(unsigned dst, const void* src, int src_bytes) {
    static const unsigned char zeros[16] = {};
    if (src_bytes != 0 && src_bytes != 16) emu::fail("cp.async source sizes other than 0 and 16 are not emulated");
    dec_cp_async16(smem_ptr(dst, 16), src_bytes ? src : zeros);
}
// 8-byte copies, with a source size of 0 or 8.
inline void cp_async8(unsigned dst, const void* src, int src_bytes) {
    static const unsigned char zeros[8] = {};
    if (src_bytes != 0 && src_bytes != 8) emu::fail("cp.async source sizes other than 0 and 8 are not emulated");
    dec_cp_async8(smem_ptr(dst, 8), src_bytes ? src : zeros);
}
// cp.async's ignore-src predicate: `zero` fills the 16 bytes without reading src.
inline void cp_async16_zero_if(unsigned dst, const void* src, bool zero) { cp_async16(dst, src, zero ? 0 : 16); }
inline void st_global_v4_if(void* p, float4 v, bool pred) {
    if (pred) std::memcpy(p, &v, 16);
}
inline void st_shared_b32(unsigned addr, unsigned v) { std::memcpy(smem_ptr(addr, 4), &v, 4); }
inline void st_shared_v2_f32(unsigned addr, float a, float b) {
    const float v[2] = {a, b};
    std::memcpy(smem_ptr(addr, 8), v, 8);
}
inline void red_add2(float* p, float a, float b) {
    p[0] += a;
    p[1] += b;
}
inline void red_add4(float* p, float4 v) {
    p[0] += v.x;
    p[1] += v.y;
    p[2] += v.z;
    p[3] += v.w;
}
inline float4 ld_shared_v4_f32(unsigned addr) {
    float4 v;
    std::memcpy(&v, smem_ptr(addr, 16), 16);
    return v;
}

}  // namespace moba

#include "ptx_swizzle.h"
