"""The per-step attention metadata, visible to layers only inside `forward_context(...)`."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from paraserve.attention.backend import AttentionMetadata

_current: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar(
    "paraserve_forward_context", default=None)


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    if _current.get() is not None:
        raise RuntimeError("forward contexts do not nest")
    token = _current.set(meta)
    try:
        yield meta
    finally:
        _current.reset(token)


def get_attention_metadata() -> AttentionMetadata:
    meta = _current.get()
    if meta is None:
        raise RuntimeError("attention layers must run inside forward_context(...)")
    return meta
