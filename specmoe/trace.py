"""Routing traces and the ``overlap`` mode's oracle prefetch.

A ``RoutingTrace`` is the routing of one run: for every exact pass (the engine's verification
or plain decoding forward, in order, prefill included) and every MoE layer, the sorted set of
experts the pass used. ``record_trace`` records it with every expert resident.

The ``overlap`` mode replays a trace of the same run (``OracleReplay``): while layer l
computes, it requests exactly the experts pass i will use at the next MoE layer, and while
the last MoE layer computes, those of pass i+1's first (re-requested at the start of pass
i+1 if the cache let them go). It is an oracle: no real system knows the next layer's
experts. It is the upper bound for prefetching, labelled so wherever it is reported. Greedy
decoding is deterministic and the batch schedule is the same in every non-speculative mode,
so pass i of the run is pass i of the trace. A run that diverges from its trace (other
prompts, another batch size) stays exact: the routing is never changed, experts the trace did
not name are fetched on demand (misses), and every (pass, layer) whose routing differs from the
trace is counted (``OracleReplay.mismatches``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

FORMAT = "specmoe-trace/1"


@dataclass
class RoutingTrace:
    """Per exact pass, per MoE layer, the sorted experts the pass used."""

    passes: list[dict[int, list[int]]] = field(default_factory=list)

    def experts(self, index: int, layer: int) -> list[int]:
        """Pass ``index``'s experts at ``layer`` (none past the trace's end)."""
        return self.passes[index].get(layer, []) if 0 <= index < len(self.passes) else []

    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, "passes": [{str(layer): e for layer, e in sorted(p.items())} for p in self.passes]}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r} (specmoe.trace.record_trace writes it)")
        return cls([{int(layer): list(e) for layer, e in p.items()} for p in data["passes"]])


def record_trace(engine_config, prompts, params, fetch=None) -> RoutingTrace:
    """Run ``prompts`` with every expert resident and record the routing of each exact pass.

    ``engine_config``'s model, dtype, device and batch limits are kept (they fix the batch
    schedule); its decoder becomes ``resident``, or with ``fetch`` (a source, for a model
    whose experts are not local) ``ondemand`` with a cache that holds every expert.
    """
    from specmoe.config import DecoderConfig
    from specmoe.engine import Engine

    decoder = DecoderConfig(mode="resident") if fetch is None else DecoderConfig(mode="ondemand", cache_budget=1.0)
    engine = Engine(replace(engine_config, decoder=decoder), fetch=fetch)
    blocks = engine.model.moe_blocks()
    first = blocks[0][0]
    trace = RoutingTrace()

    def record(router, x, logits, weights, indices):
        if router.layer == first:
            trace.passes.append({})
        trace.passes[-1][router.layer] = sorted(set(indices.reshape(-1).tolist()))  # sync: the trace lives on the host
        return logits, weights, indices

    for _, block in blocks:
        block.gate.add_hook(record)
    try:
        engine.generate(prompts, params)
    finally:
        for _, block in blocks:
            block.gate.remove_hook(record)
    return trace


class OracleReplay:
    """The overlap mode's prefetch: requests each pass's next-layer experts from the trace.

    ``layers``: the MoE layers in forward order. ``route`` is called from the runtime's router
    hook in exact phase, before the layer's experts run.
    """

    def __init__(self, trace: RoutingTrace, layers: list[int]):
        self.trace, self.layers = trace, layers
        self.following = dict(zip(layers, layers[1:]))
        self.index = -1  # the pass running now
        self.mismatches = 0  # (pass, layer) whose routing differed from the trace's

    def route(self, runtime, layer: int, indices) -> None:
        first = self.layers[0]
        if layer == first:
            self.index += 1
            runtime.request(first, self.trace.experts(self.index, first), prefetch=True)  # no-op when prefetched and kept
        used = sorted(set(indices.reshape(-1).tolist()))  # sync: compared with the trace on the host
        self.mismatches += used != self.trace.experts(self.index, layer)
        nxt_pass, nxt = (self.index, self.following[layer]) if layer in self.following else (self.index + 1, first)
        runtime.request(nxt, self.trace.experts(nxt_pass, nxt), prefetch=True)
