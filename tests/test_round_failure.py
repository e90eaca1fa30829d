"""A round that raises halfway leaves the engine as it was before the round.

A source that fails once (a raised fetch, or futures that fail when waited on) is armed at
different points of a round: while drafting, at verification. The failed ``step()`` must
leave every request where it was (queue, committed tokens, KV lengths), and the steps that
follow must produce the resident engine's tokens.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_source import ExpertUnavailableError
from specmoe.offload import checkpoint_fetcher
from specmoe.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17, 18, 19]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


class FailingSource:
    """Experts read in-process; once armed, the ``fail_at``-th fetch fails (raised or in its futures)."""

    def __init__(self, model_dir, how: str):
        self.inner, self.how = checkpoint_fetcher(model_dir), how
        self.calls, self.fail_at, self.failed = 0, None, 0

    def __call__(self, layer: int, experts: list[int]) -> dict[int, Future]:
        if self.fail_at is not None:
            self.calls += 1
            if self.calls == self.fail_at:
                self.failed += 1
                err = ExpertUnavailableError(f"experts {experts} of layer {layer}: injected failure")
                if self.how == "raise":
                    raise err
                futures = {e: Future() for e in experts}
                for f in futures.values():
                    f.set_exception(err)
                return futures
        return self.inner(layer, experts)


@pytest.fixture(scope="module")
def resident(shipped_model):
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=4))
    return [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]


def state(engine) -> dict:
    """Everything a round may change about the requests."""
    return {
        "waiting": [(s.request_id, list(s.output), s.slot) for s in engine.waiting],
        "running": [(s.request_id, list(s.output), s.slot, engine.cache.lengths[s.slot], s.finish_reason)
                    for s in engine.running],
        "free": engine.cache.num_free(),
    }


@pytest.mark.parametrize("how", ["raise", "future"])
@pytest.mark.parametrize("mode, fail_at", [("specmoe", 1), ("specmoe", 3), ("specmoe", 6), ("ondemand", 2)])
def test_a_round_that_raises_halfway_changes_nothing(shipped_model, resident, how, mode, fail_at):
    decoder = DecoderConfig(mode=mode, k=3, cache_budget=0.25, draft_policy="shadow")
    source = FailingSource(shipped_model, how)
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=3, decoder=decoder), fetch=source)
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]  # 3 slots: the fourth waits
    got = {rid: [] for rid in ids}
    for _ in range(2):
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    source.fail_at = fail_at
    while source.failed == 0 and engine.has_unfinished():  # a round that fetches less than fail_at times completes
        before = state(engine)
        try:
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
        except ExpertUnavailableError:
            assert state(engine) == before
            assert not engine.runtime.in_flight and not engine.runtime.staged
    assert source.failed == 1
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert [got[rid] for rid in ids] == resident
