"""Migration timing: when the draft's predicted experts are requested.

eager:    as each draft step predicts them (transfers overlap drafting);
deferred: once, when verification starts, one coalesced request per layer for the round.
Both leave the output exact: verification never uses anything but the exact experts.
"""

from __future__ import annotations

from collections import Counter

import pytest

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.offload import checkpoint_fetcher
from specmoe.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


class CountingSource:
    """The checkpoint, recording for every fetch call the round it came in and the phase
    ("migrate": the requests made when the draft ends)."""

    def __init__(self, model_dir):
        self.read = checkpoint_fetcher(model_dir)
        self.engine = None
        self.migrating = False
        self.calls: list[tuple[int, str, int]] = []  # (round, phase, layer)

    def __call__(self, layer, experts):
        if self.engine is not None:  # None: setting up (pinning, shadow copies)
            phase = "migrate" if self.migrating else self.engine.runtime.phase
            self.calls.append((self.engine.counters.rounds, phase, layer))
        return self.read(layer, experts)


def run(path, decoder):
    source = CountingSource(path)
    engine = Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS), decoder=decoder), fetch=source)
    source.engine = engine
    end_draft = engine.runtime.end_draft

    def marked_end_draft():
        source.migrating = True
        try:
            end_draft()
        finally:
            source.migrating = False

    engine.runtime.end_draft = marked_end_draft
    outs = engine.generate(PROMPTS, PARAMS)
    return [o.token_ids for o in outs], engine, source


@pytest.fixture(scope="module")
def refs(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    engine = Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS)))
    return [o.token_ids for o in engine.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("policy", ["resident", "shadow"])
@pytest.mark.parametrize("migration", ["eager", "deferred"])
@pytest.mark.parametrize("k", [1, 3])
def test_both_migrations_are_exact(checkpoints, refs, migration, policy, k):
    path = checkpoints[("mixtral", "per_expert")]
    decoder = DecoderConfig(mode="specmoe", draft_policy=policy, k=k, cache_budget=0.25, migration=migration)
    tokens, engine, _ = run(path, decoder)
    assert tokens == refs
    assert engine.counters.drafted_tokens > 0


def test_deferred_requests_nothing_while_drafting_and_coalesces_the_round(checkpoints, refs):
    path = checkpoints[("mixtral", "per_expert")]
    calls = {}
    for migration in ("eager", "deferred"):
        # the shadow draft routes with the whole router: what it predicts does not depend on which
        # experts have arrived by then (the resident draft's does, so its request counts vary run to run)
        decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, cache_budget=0.25, migration=migration)
        tokens, engine, source = run(path, decoder)
        assert tokens == refs
        calls[migration] = (source.calls, engine.counters.draft_rounds)
    deferred, eager = calls["deferred"][0], calls["eager"][0]
    assert [c for c in deferred if c[1] == "draft"] == []
    assert sum(1 for c in eager if c[1] == "draft") > 0
    # eager asks for a layer several times in a round (once per draft step that predicts a new expert)
    assert max(Counter((r, layer) for r, phase, layer in eager if phase == "draft").values()) > 1
    # deferred asks for each layer at most once per round, when the draft ends
    assert max(Counter((r, layer) for r, phase, layer in deferred if phase == "migrate").values()) == 1
    predicted = {"eager": "draft", "deferred": "migrate"}
    per_round = {m: sum(1 for c in cs if c[1] == predicted[m]) / rounds for m, (cs, rounds) in calls.items()}
    assert 0 < per_round["deferred"] < per_round["eager"], per_round


def test_an_unknown_migration_is_refused():
    with pytest.raises(ValueError, match="unknown migration 'lazy'; allowed: eager, deferred"):
        DecoderConfig(migration="lazy")
