"""Monte Carlo of MoBA routing: planted-needle generators, key convolution, routing rules and two routers.

* generators: :func:`random_unit_vectors`, :func:`planted_keys`, :func:`plant_into`,
  :func:`random_cluster_positions`, :func:`planted_needle` (:class:`PlantedNeedle`);
* key convolution: :func:`key_conv`, :func:`averaging_weights`, :class:`KeyConv`;
* MoBA routing rules on given vectors: :func:`block_centroids`, :func:`block_scores`, :func:`select_blocks`,
  :func:`block_hit`;
* :func:`score_level_router` / :func:`score_level_router_causal` sample the Gaussian block-score model that
  :mod:`mobalab.snr` integrates (exactly, with a binomial or an explicit sampler);
* :func:`vector_level_router` samples real unit vectors (optionally key-convolved) and applies the routing
  rules above, in numpy or torch (CPU or CUDA);
* :func:`spawn_generators`: the independent random streams that one ``seed`` stands for.

RoPE: :func:`rope_vector_router` routes RoPE'd vectors, a span of relevant tokens rotated by position
(:func:`apply_rope`).

Every simulator takes an explicit ``seed`` (int or numpy Generator) and returns a tidy DataFrame, one row
per configuration, with hits, trials, estimate and a 95% Wilson interval. The routing rules are those of
docs/design.md, "MoBA semantics"; the implementation lives in private modules (``_name.py``), this package
is the public face.
"""

from ._block_routing import block_centroids, block_hit, block_scores, select_blocks
from ._key_convolution import KeyConv, averaging_weights, key_conv
from ._planted_needle import (
    PlantedNeedle,
    plant_into,
    planted_keys,
    planted_needle,
    random_cluster_positions,
    random_unit_vectors,
)
from ._rope_router import apply_rope, plant_rope_span, random_span_positions, rope_vector_router
from ._score_router import score_level_router, score_level_router_causal
from ._seeding import spawn_generators
from ._vector_router import vector_level_router

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
    "spawn_generators",
]
