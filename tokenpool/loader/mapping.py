"""One weight loader for every model, driven by a per-model mapping table.

A `WeightMap` says how a checkpoint's keys become our parameter names: a key prefix replaced (the first
that matches), then renames applied in order (a rename may name a shard: the checkpoint tensor is that part
of a stacked parameter, as nano-vllm's `packed_modules_mapping`: q/k/v -> qkv, gate/up -> gate_up). A stacked
parameter's module declares its parts' sizes as `packed_sizes` (e.g. grouped KV heads: q, k, v of unequal
size). Every copy checks the shape; at the end every parameter must have been loaded, a stacked one whole or
in all its parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenpool.loader.weights import check_complete, copy_weight


@dataclass(frozen=True)
class WeightMap:
    """prefixes: (checkpoint prefix, ours), the first that matches is replaced; keys matching none keep their
    name. skip: our-side name prefixes that are not weights of ours (heads of task models, buffers).
    renames: (old, new, shard) substring renames, each applied where it matches, in order; shard: which part
    of a stacked parameter the tensor is. transforms: our parameter name -> a function of the tensor (e.g. a
    convolution kernel flattened for a GEMM)."""

    prefixes: tuple[tuple[str, str], ...] = ()
    skip: tuple[str, ...] = ()
    renames: tuple[tuple[str, str, int | None], ...] = ()
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def target(self, name: str) -> tuple[str | None, int | None]:
        """Checkpoint key -> (our parameter name, shard), or (None, None) for a key we do not use."""
        for old, new in self.prefixes:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith(self.skip):
            return None, None
        shard = None
        for old, new, part in self.renames:
            if old in name:
                name = name.replace(old, new, 1)
                shard = part if part is not None else shard
        return name, shard


def load_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: WeightMap) -> None:
    """Copy a checkpoint into `module` through `mapping`; ValueError on unknown, misshapen or missing weights."""
    params = dict(module.named_parameters())
    whole: set[str] = set()
    parts: dict[str, set[int]] = {}
    for name, tensor in weights:
        target, shard = mapping.target(name)
        if target is None:
            continue
        param = params.get(target)
        if param is None:
            raise ValueError(f"Unexpected weight {name!r} in checkpoint (no parameter {target!r}).")
        if target in mapping.transforms:
            tensor = mapping.transforms[target](tensor)
        if shard is None:
            copy_weight(param, tensor, name)
            whole.add(target)
        else:
            sizes = _packed_sizes(module, target)
            expected = (sizes[shard], *param.shape[1:])
            if tuple(tensor.shape) != expected:  # a part's rows are known: a short part must not slip in
                raise ValueError(f"Weight {name!r} has shape {tuple(tensor.shape)}, expected {expected}.")
            copy_weight(param, tensor, name, sum(sizes[:shard]))
            parts.setdefault(target, set()).add(shard)
    complete = set(whole)
    for target, seen in parts.items():
        if len(seen) == len(_packed_sizes(module, target)):
            complete.add(target)
    check_complete(set(params), complete)


def _packed_sizes(module: nn.Module, target: str) -> tuple[int, ...]:
    owner = module.get_submodule(target.rsplit(".", 1)[0])
    sizes = getattr(owner, "packed_sizes", None)
    if sizes is None:
        raise ValueError(f"{target} is loaded in parts, but its module declares no packed_sizes.")
    return sizes
