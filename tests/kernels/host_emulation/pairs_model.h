// What pairs.cu needs of a harness besides cuda_host.h and static shared arrays (`__shared__` as `static`: the CTAs
// of a launch run one after another, so a static is one CTA's shared memory): its dynamic shared memory, and
// __match_any_sync (the lanes of the warp holding the same value). Included before pairs.cu's text.
#pragma once

#include "cuda_host.h"

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
