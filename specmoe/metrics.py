"""The metrics of a run, named with the speculation vocabulary of ``specmoe.speculative``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RoundCounters:
    rounds: int = 0
    draft_rounds: int = 0  # rounds in which at least one sequence drafted
    verified: int = 0  # sequence-rounds that checked a draft
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # accepted and emitted: none past a stop token
    draft_s: float = 0.0
    verify_s: float = 0.0

    def record(self, drafted: list[int], accepted: list[int], draft_s: float, verify_s: float) -> None:
        self.rounds += 1
        self.draft_rounds += any(drafted)
        self.verified += sum(1 for d in drafted if d)
        self.drafted_tokens += sum(drafted)
        self.accepted_tokens += sum(a for d, a in zip(drafted, accepted) if d)
        self.draft_s += draft_s
        self.verify_s += verify_s


def model_bytes(model) -> int:
    """Bytes of the parameters the decoder holds itself (dense part, plus experts if resident)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def summarize(engine, generated_tokens: int, wall_s: float) -> dict:
    """Everything a run reports, as a flat dict of named numbers."""
    c = engine.counters
    out = {
        "generated_tokens": generated_tokens,
        "wall_s": wall_s,
        "tokens_per_s": generated_tokens / wall_s if wall_s else 0.0,
        "time_per_output_token_ms": 1000 * wall_s / generated_tokens if generated_tokens else 0.0,
        "rounds": c.rounds,
        "draft_rounds": c.draft_rounds,
        "drafted_tokens": c.drafted_tokens,
        "accepted_tokens": c.accepted_tokens,
        "acceptance_rate": c.accepted_tokens / c.drafted_tokens if c.drafted_tokens else 0.0,
        "mean_accepted_per_round": c.accepted_tokens / c.verified if c.verified else 0.0,
        "draft_s": c.draft_s,
        "verify_s": c.verify_s,
        "dense_bytes": model_bytes(engine.model),
        "kv_bytes": engine.cache.nbytes,
    }
    rt = engine.runtime
    if rt is not None:
        f = rt.counters
        per_token = 1 / generated_tokens if generated_tokens else 0.0
        out.update(
            {
                "expert_bytes_moved": f.bytes_moved,
                "startup_bytes_moved": rt.startup_bytes,  # before the run: pinning the hot set, building the shadow
                "expert_bytes_per_token": f.bytes_moved * per_token,
                "fetch_requests": f.fetch_requests,
                "fetch_requests_per_token": f.fetch_requests * per_token,
                "prefetched": f.prefetched,
                "misses": f.misses,
                "remote_computes": f.remote_computes,
                "remote_activation_bytes": f.remote_activation_bytes,
                "stall_s": f.stall_s,
                "prediction_precision": f.precision,
                "prediction_recall": f.recall,
                "cache_hit_rate": rt.cache.stats.hit_rate,
                "cache_budget_bytes": rt.cache.budget,
                "cache_peak_bytes": rt.cache.peak_bytes,
                "shadow_bytes": rt.shadow_bytes,
                "staged_peak_bytes": f.peak_staged_bytes,
            }
        )
    out["peak_decoder_bytes"] = (
        out["dense_bytes"]
        + out["kv_bytes"]
        + out.get("cache_peak_bytes", 0)
        + out.get("shadow_bytes", 0)
        + out.get("staged_peak_bytes", 0)
    )
    return out
