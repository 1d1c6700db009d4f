// Bulk reductions of sm_90: the bulk copy engine adds a contiguous run of fp32 values from shared memory into global
// memory (cp.reduce.async.bulk), asynchronously, in place of one atomic instruction per pair of floats per thread.
//
// Source: NVIDIA's PTX ISA (8.x), "Data Movement and Conversion Instructions: cp.reduce.async.bulk":
//   cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [dstMem], [srcMem], size
// adds size bytes (a multiple of 16; both addresses 16-byte aligned) element-wise into global memory, each element
// atomically (relaxed, GPU scope). The operation belongs to the executing thread's current bulk async-group:
// cp.async.bulk.commit_group closes the group, cp.async.bulk.wait_group.read N waits until the sources of all but
// the newest N groups have been read (shared memory may then be rewritten), cp.async.bulk.wait_group N until they
// have completed. The source is read through the async proxy: the threads that wrote it with ordinary stores issue
// fence.proxy.async.shared::cta before the barrier that hands it to the issuing thread.
#ifndef MOBALAB_BULK_REDUCE_CUH
#define MOBALAB_BULK_REDUCE_CUH

namespace moba {

// dst[0 .. bytes / 4) += the fp32 values at shared address src (one element at a time, atomically).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, unsigned src, unsigned bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The sources of all but the newest N committed groups of this thread have been read.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// All but the newest N committed groups of this thread have completed (their writes performed).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace moba

#endif  // MOBALAB_BULK_REDUCE_CUH
