"""Analytic model of MoBA routing: SNR, exact top-k hit probability, causal corrections, inverse design.

Each group follows one section of docs/design.md, "The routing model":

* "SNR": :func:`delta_mu_eff`, :func:`snr` (SNR = Δμ_eff / (σ sqrt(2B))), :func:`pairwise_failure`
  (Φ(-SNR)) and :func:`paper_threshold` (Φ^{-1}(1 - k/n));
* "Exact top-k hit probability": :func:`hit_probability`, exact in the Gaussian block-score model, with
  unequal signal / noise variances;
* "Causal routing": :func:`causal_hit_probability` (own block forced, k - 1 slots among complete past
  blocks), point values and exact averages over query and needle positions;
* "Generator variance": :func:`planted_token_variance`, :func:`generator_block_model`
  (:class:`BlockScoreModel`), the exact block-score moments of the simulators' vector generator;
* "Clustering and key convolution": :func:`cluster_rho`, :func:`clustering_multiplier` (1 + (m-1)ρ),
  :func:`conv_coverage`, :func:`cluster_stats`, :func:`linear_conv_block_model`
  (:class:`LinearConvBlockModel`), :func:`linear_conv_hit_probability`;
* "RoPE": :func:`rope_frequencies`, :func:`dirichlet_factor`, :func:`rope_pair_factors`,
  :func:`rope_delta_mu_eff`, :func:`rope_clustering_multiplier`, :func:`rope_block_model`
  (:class:`RopeBlockModel`): the signal of a span under rotary position encoding;
* "Inverse design": :func:`required_snr`, :func:`causal_required_snr`, :func:`design_table`,
  :func:`largest_block_size`, :func:`smallest_top_k`, :func:`smallest_head_dim`.

Everything is numpy/scipy in float64 and broadcasts over array arguments where noted. The implementation
lives in private modules (``_name.py``); this package is the public face.
"""

from ._causal_hit import causal_hit_probability
from ._clustering import cluster_rho, clustering_multiplier
from ._generator_variance import BlockScoreModel, generator_block_model, planted_token_variance
from ._inverse_design import (
    causal_required_snr,
    design_table,
    largest_block_size,
    required_snr,
    smallest_head_dim,
    smallest_top_k,
)
from ._key_conv_model import (
    LinearConvBlockModel,
    cluster_stats,
    conv_coverage,
    linear_conv_block_model,
    linear_conv_hit_probability,
)
from ._paper_snr import delta_mu_eff, pairwise_failure, paper_threshold, snr
from ._rope_signal import (
    RopeBlockModel,
    dirichlet_factor,
    rope_block_model,
    rope_clustering_multiplier,
    rope_delta_mu_eff,
    rope_frequencies,
    rope_pair_factors,
)
from ._topk_hit import hit_probability

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

