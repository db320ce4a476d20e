"""The pooling tasks, named in one place.

embed: one pooled vector per prompt; token_embed: one vector per token; token_classify: one scalar per
token (BGE-M3's sparse lexical weights); classify: one label distribution per prompt (no supported model has
such a head yet). COMBINED_TASK: every head's output of a model with several heads, from one forward pass.
"""

from __future__ import annotations

from typing import Literal, get_args

PoolingTask = Literal["embed", "token_embed", "token_classify", "classify"]
PUBLIC_TASKS: tuple[str, ...] = get_args(PoolingTask)  # what a request may ask for by name
COMBINED_TASK = "all"
TASKS: tuple[str, ...] = (*PUBLIC_TASKS, COMBINED_TASK)
# The tasks whose vectors can be scored: cosine of pooled vectors, MaxSim of token matrices.
ScoreTask = Literal["embed", "token_embed"]
