"""Integrations of mobalab's MoBA attention with model libraries.

:mod:`mobalab.integrations.transformers` makes MoBA an attention implementation of Hugging Face
``transformers`` (``attn_implementation="moba"``); it needs the optional extra ``mobalab[hf]``. Nothing here
imports a model library until its module is imported.
"""

from __future__ import annotations

__all__: list[str] = []
