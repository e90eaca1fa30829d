"""Prometheus metrics of a running deployment, through ``ray.util.metrics``.

The coordinator records the request-level metrics, each decoder its expert traffic; Ray
exports both on every node's metrics endpoint (``ray start --metrics-export-port``) with
its own ``ray_`` prefix, and counters with the ``_total`` suffix of Prometheus counters
(``ray_specmoe_requests_total``). ``METRICS`` is the documented list; the words are the
speculation vocabulary of ``specmoe.speculative``:

* **drafted** tokens are proposed by the draft; **accepted** ones verification kept (the
  bonus token is not counted as accepted);
* a **prefetch hit** is an expert the draft predicted that verification then needed; a
  **prefetch miss** is an expert verification needed that was neither resident nor in
  flight, so it was fetched on demand (a stall).

Ray exports a gauge only while it is set again at least every two export intervals: the
coordinator's gauges are refreshed every second; a decoder's cache hit rate is exported
while it runs rounds (``ray_specmoe_prefetch_*`` and the byte counters are cumulative).
Without Ray (the plain classes in unit tests) every call is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# time to first token: [0.01 s, 60 s]; time per output token: [1 ms, 1 s]
LATENCY_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# bucket le=N.5 counts the rounds that accepted at most N draft tokens (Ray needs positive bounds)
ACCEPTED = (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 8.5, 12.5, 16.5)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


METRICS = (
    MetricDef("specmoe_requests", "counter", "Requests that ended, by outcome: stop, length, abort, error "
              "(finished requests) or rejected (the admission queue was full).", ("outcome",)),
    MetricDef("specmoe_generated_tokens", "counter", "Committed output tokens (accepted draft tokens and bonus tokens)."),
    MetricDef("specmoe_queue_depth", "gauge", "Requests waiting in the coordinator's admission queue."),
    MetricDef("specmoe_running_requests", "gauge", "Requests placed on decoders."),
    MetricDef("specmoe_drafted_tokens", "counter", "Draft tokens proposed for verification."),
    MetricDef("specmoe_accepted_tokens", "counter", "Draft tokens verification accepted."),
    MetricDef("specmoe_acceptance_rate", "gauge", "Accepted / drafted tokens since the coordinator started."),
    MetricDef("specmoe_accepted_tokens_per_round", "histogram", "Draft tokens accepted per request per round that "
              "verified a draft; bucket le=N.5 counts rounds that accepted at most N.", (), ACCEPTED),
    MetricDef("specmoe_time_to_first_token_seconds", "histogram", "Seconds from admission to the first committed "
              "token, per request.", (), LATENCY_S),
    MetricDef("specmoe_time_per_output_token_seconds", "histogram", "Seconds per committed token after the first, "
              "per finished request.", (), TOKEN_S),
    MetricDef("specmoe_expert_bytes_fetched", "counter", "Expert weight bytes a decoder fetched from the stores.",
              ("decoder",)),
    MetricDef("specmoe_expert_fetch_requests", "counter", "Expert transfers a decoder asked for, one per "
              "(layer, expert).", ("decoder",)),
    MetricDef("specmoe_prefetch_hits", "counter", "Experts the draft predicted that verification needed.", ("decoder",)),
    MetricDef("specmoe_prefetch_misses", "counter", "Experts verification needed that were neither resident nor in "
              "flight: fetched on demand.", ("decoder",)),
    MetricDef("specmoe_cache_hit_rate", "gauge", "Share of expert lookups a decoder's expert cache served, since it "
              "started.", ("decoder",)),
)


def _make(d: MetricDef):
    from ray.util import metrics

    if d.kind == "counter":
        return metrics.Counter(d.name, d.description, d.tags)
    if d.kind == "gauge":
        return metrics.Gauge(d.name, d.description, d.tags)
    return metrics.Histogram(d.name, d.description, list(d.boundaries), d.tags)


class Metrics:
    """The metric objects of ``names`` this process records (none outside Ray); ``tags`` are
    added to every record."""

    def __init__(self, names: tuple[str, ...], tags: dict[str, str] | None = None):
        import ray

        self.tags = tags or {}
        self.objects = {d.name: _make(d) for d in METRICS if d.name in names} if ray.is_initialized() else {}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0 and name in self.objects:
            self.objects[name].inc(value, self.tags | tags)

    def set(self, name: str, value: float) -> None:
        if name in self.objects:
            self.objects[name].set(value, self.tags)

    def observe(self, name: str, value: float) -> None:
        if name in self.objects:
            self.objects[name].observe(value, self.tags)


COORDINATOR_METRICS = tuple(d.name for d in METRICS if "decoder" not in d.tags)
DECODER_METRICS = tuple(d.name for d in METRICS if "decoder" in d.tags)


class CoordinatorTelemetry:
    """What the coordinator records: requests, tokens, queue, acceptance, latencies."""

    def __init__(self):
        self.m = Metrics(COORDINATOR_METRICS)
        self.drafted = self.accepted = 0

    def queue(self, queued: int, running: int) -> None:
        """The queue and its gauges; the coordinator calls this at least once a second (Ray
        stops exporting a gauge that is not set again within two export intervals)."""
        self.m.set("specmoe_queue_depth", queued)
        self.m.set("specmoe_running_requests", running)
        if self.drafted:
            self.m.set("specmoe_acceptance_rate", self.accepted / self.drafted)

    def rejected(self) -> None:
        self.m.inc("specmoe_requests", outcome="rejected")

    def round(self, tokens: int, drafted: int, accepted: int) -> None:
        """One request's share of a decoder round: its committed tokens and its draft."""
        self.m.inc("specmoe_generated_tokens", tokens)
        if drafted:
            self.drafted, self.accepted = self.drafted + drafted, self.accepted + accepted
            self.m.inc("specmoe_drafted_tokens", drafted)
            self.m.inc("specmoe_accepted_tokens", accepted)
            self.m.observe("specmoe_accepted_tokens_per_round", accepted)
            self.m.set("specmoe_acceptance_rate", self.accepted / self.drafted)

    def finished(self, reason: str, metrics: dict) -> None:
        """A request ended; ``metrics`` is its ``Request.metrics()``."""
        self.m.inc("specmoe_requests", outcome=reason)
        if metrics.get("time_to_first_token_s") is not None:
            self.m.observe("specmoe_time_to_first_token_seconds", metrics["time_to_first_token_s"])
        if metrics.get("time_per_output_token_s") is not None:
            self.m.observe("specmoe_time_per_output_token_seconds", metrics["time_per_output_token_s"])


class DecoderTelemetry:
    """What a decoder records after each round: its expert traffic since the last round."""

    FETCH = {"specmoe_expert_bytes_fetched": "bytes_moved", "specmoe_expert_fetch_requests": "fetch_requests",
             "specmoe_prefetch_hits": "true_positives", "specmoe_prefetch_misses": "misses"}

    def __init__(self):
        self.m = Metrics(DECODER_METRICS, {"decoder": _process_name()})
        self.last = dict.fromkeys(self.FETCH, 0)

    def round(self, engine) -> None:
        runtime = engine.runtime
        if runtime is None:  # resident: nothing is fetched
            return
        for name, field in self.FETCH.items():
            now = getattr(runtime.counters, field)
            self.m.inc(name, now - self.last[name])
            self.last[name] = now
        self.m.set("specmoe_cache_hit_rate", runtime.cache.stats.hit_rate)


def _process_name() -> str:
    """This actor's name (``specmoe-decoder-0``), or ``pid-N`` for an unnamed process."""
    import ray

    name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    return name or f"pid-{os.getpid()}"
