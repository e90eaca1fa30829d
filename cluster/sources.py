"""Expert sources for a decoder, brought up on demand: ``remote_experts(model, transport)``.

A context manager that yields ``fetch(layer, experts) -> {expert: Future[(gate_up, down)]}``
and tears down whatever it started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

TRANSPORTS = ("local", "ray", "grpc")


@contextlib.contextmanager
def remote_experts(model_dir, transport: str) -> Iterator:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown experts transport {transport!r}; allowed: {', '.join(TRANSPORTS)}")
    if transport == "local":
        from specmoe.offload import checkpoint_fetcher

        yield checkpoint_fetcher(model_dir)
        return
    raise NotImplementedError(f"the {transport} transport is not wired yet")
