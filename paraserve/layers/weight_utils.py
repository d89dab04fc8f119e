"""Checkpoint tensors as weight loaders receive them: a torch.Tensor, or a lazy safetensors slice
(`iter_weights(src, lazy=True)`) from which a rank reads only the rows of its own shard."""
from __future__ import annotations

from typing import Any, Union

import torch

Loaded = Union[torch.Tensor, Any]  # Any: safetensors' PySafeSlice (get_shape(), __getitem__)


def shape_of(loaded: Loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def narrow(loaded: Loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """loaded.narrow(dim, start, length), reading only that part of a lazy slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = (slice(None),) * dim + (slice(start, start + length),)
    return loaded[index]


def materialize(loaded: Loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]
