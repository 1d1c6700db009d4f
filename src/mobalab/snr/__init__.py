"""Analytic model of MoBA routing: SNR, exact top-k hit probability, causal corrections, inverse design.

* :mod:`.model` -- Δμ_eff, the paper's SNR = Δμ_eff / (σ sqrt(2B)), pairwise failure Φ(-SNR) and the
  paper's threshold Φ^{-1}(1 - k/n);
* :mod:`.topk` -- exact P(signal block in the top k of n) in the Gaussian block-score model, with
  unequal signal / noise variances;
* :mod:`.causal` -- causal MoBA (own block forced, k - 1 slots among complete past blocks), point
  values and exact averages over query and needle positions;
* :mod:`.generator` -- exact block-score moments of the vector generator the simulators use;
* :mod:`.clustering` -- the clustering multiplier 1 + (m-1)ρ;
* :mod:`.design` -- required SNR, design tables and the largest B / smallest k / smallest d that reach
  a target;
* :mod:`.key_conv` -- exact block-score moments under a linear key convolution (coverage, m, μ_cluster).

RoPE: :mod:`.rope` -- the Dirichlet factor of a span, Δμ_eff and the block-score moments with rotary
position encoding.

Everything is numpy/scipy in float64 and broadcasts over array arguments where noted.
"""

from .causal import causal_hit_probability
from .clustering import cluster_rho, clustering_multiplier
from .design import (
    causal_required_snr,
    design_table,
    largest_block_size,
    required_snr,
    smallest_head_dim,
    smallest_top_k,
)
from .generator import BlockScoreModel, generator_block_model, planted_token_variance
from .key_conv import (
    LinearConvBlockModel,
    cluster_stats,
    conv_coverage,
    linear_conv_block_model,
    linear_conv_hit_probability,
)
from .model import delta_mu_eff, pairwise_failure, paper_threshold, snr
from .rope import (
    RopeBlockModel,
    dirichlet_factor,
    rope_block_model,
    rope_clustering_multiplier,
    rope_delta_mu_eff,
    rope_frequencies,
    rope_pair_factors,
)
from .topk import hit_probability

__all__ = [
    "delta_mu_eff",
    "snr",
    "pairwise_failure",
    "paper_threshold",
    "hit_probability",
    "causal_hit_probability",
    "planted_token_variance",
    "generator_block_model",
    "BlockScoreModel",
    "cluster_rho",
    "clustering_multiplier",
    "required_snr",
    "causal_required_snr",
    "design_table",
    "largest_block_size",
    "smallest_top_k",
    "smallest_head_dim",
    "conv_coverage",
    "cluster_stats",
    "LinearConvBlockModel",
    "linear_conv_block_model",
    "linear_conv_hit_probability",
    "rope_frequencies",
    "dirichlet_factor",
    "rope_pair_factors",
    "rope_clustering_multiplier",
    "rope_delta_mu_eff",
    "RopeBlockModel",
    "rope_block_model",
]

