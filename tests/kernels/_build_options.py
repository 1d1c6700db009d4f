"""The wgmma backward's build options as the CPU tests build them, in three sets (the serial tile loop with the
options that apply to it; the dQ-next loop staging under the next Sᵀ, with the early lse; the build before the
stepped descriptors, unmasked full tiles and dQ-next loop became the default: each key names the emulation's
harness fixture, harness_<key>), which the host emulation runs and nvcc compiles, and the spill bytes (stores +
loads) each set's build may take: a few loop invariants kept in local memory and read from L1 once per tile, known
and small (the default build spills nothing, cuda/attention_bwd_wgmma.cuh)."""

from __future__ import annotations

from mobalab.kernels import _cuda_backward

BWD_OPTION_SETS = {
    "serial": ("MOBA_BWD_WG_DQ_NEXT=0", "MOBA_BWD_WG_LATE_GATHER=1", "MOBA_BWD_WG_EARLY_LSE=1"),
    "dq_next": ("MOBA_BWD_WG_DQ_NEXT=1", "MOBA_BWD_WG_EARLY_LSE=1"),
    "plain": ("MOBA_BWD_WG_STEP_DESC=0", "MOBA_BWD_WG_FULL_TILES=0", "MOBA_BWD_WG_DQ_NEXT=0"),
}
BWD_SPILL_ALLOWANCE = {"serial": 64, "dq_next": 40, "plain": 0}

assert {o for opts in BWD_OPTION_SETS.values() for o in opts} == set(_cuda_backward.WGMMA_BUILD_OPTIONS)
assert set(BWD_SPILL_ALLOWANCE) == set(BWD_OPTION_SETS)
