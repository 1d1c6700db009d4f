// What the top-k harnesses model of ptx.cuh alike: shared addresses as the kernels see them (the byte offset
// into the launch's dynamic shared memory plus 16, so that a kernel's own alignment of its tiles is exercised
// and an address outside the launch's shared memory fails) and the float constants. Included inside namespace
// moba, before the kernel text.
constexpr unsigned kSmemBase = 16;
inline unsigned char* smem_ptr(unsigned addr, unsigned bytes) {
    if (addr < kSmemBase || addr - kSmemBase + bytes > emu::cta().smem_bytes)
        emu::fail("shared-memory address out of the launch's dynamic shared memory");
    return emu::dynamic_smem() + (addr - kSmemBase);
}
inline unsigned smem_u32(const void* p) {
    return kSmemBase + static_cast<unsigned>(static_cast<const unsigned char*>(p) - emu::dynamic_smem());
}
inline float neg_inf() { return -std::numeric_limits<float>::infinity(); }
inline float pos_inf() { return std::numeric_limits<float>::infinity(); }
inline float quiet_nan() { return std::numeric_limits<float>::quiet_NaN(); }
