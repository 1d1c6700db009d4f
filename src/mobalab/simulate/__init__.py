"""Monte Carlo of MoBA routing: planted-needle generators, key convolution and two routers.

* :func:`score_level_router` / :func:`score_level_router_causal` sample the Gaussian block-score model that
  :mod:`mobalab.snr` integrates (exactly, with a binomial or an explicit sampler);
* :func:`vector_level_router` samples real unit vectors (optionally key-convolved) and applies the exact
  MoBA routing rules of :mod:`mobalab.simulate.routing`, in numpy or torch (CPU or CUDA).

RoPE: :func:`rope_vector_router` routes RoPE'd vectors, a span of relevant tokens rotated by position
(:func:`apply_rope`, :mod:`mobalab.simulate.rope`).

Every simulator takes an explicit ``seed`` (int or numpy Generator) and returns a tidy DataFrame, one row
per configuration, with hits, trials, estimate and a 95% Wilson interval.
"""

from .generators import (
    PlantedNeedle,
    plant_into,
    planted_keys,
    planted_needle,
    random_cluster_positions,
    random_unit_vectors,
)
from .key_conv import KeyConv, averaging_weights, key_conv
from .rope import apply_rope, plant_rope_span, random_span_positions, rope_vector_router
from .routing import block_centroids, block_hit, block_scores, select_blocks
from .score_router import score_level_router, score_level_router_causal
from .vector_router import vector_level_router

__all__ = [
    "PlantedNeedle",
    "random_unit_vectors",
    "planted_keys",
    "plant_into",
    "random_cluster_positions",
    "planted_needle",
    "KeyConv",
    "key_conv",
    "averaging_weights",
    "block_centroids",
    "block_scores",
    "select_blocks",
    "block_hit",
    "score_level_router",
    "score_level_router_causal",
    "vector_level_router",
    "apply_rope",
    "random_span_positions",
    "plant_rope_span",
    "rope_vector_router",
]
