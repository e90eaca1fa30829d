"""The overlap mode: an oracle that replays a recorded routing trace of the same run and
prefetches exactly the next layer's experts (the upper bound for prefetching).

With the run's own trace no expert is ever fetched on demand; with another run's trace the
output is still exact (the routing is never changed) and the mismatches are counted."""

from __future__ import annotations

import pytest

from specmoe.config import MODES, DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams
from specmoe.trace import RoutingTrace, record_trace

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
OTHER_PROMPTS = [[40, 41, 42], [50, 51, 52, 53, 54]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
    path = checkpoints[("mixtral", "per_expert")]
    config = EngineConfig(model=path, max_batch_size=len(PROMPTS))
    refs = [o.token_ids for o in Engine(config).generate(PROMPTS, PARAMS)]
    root = tmp_path_factory.mktemp("traces")
    record_trace(config, PROMPTS, PARAMS).save(root / "same.json")
    record_trace(config, OTHER_PROMPTS, PARAMS).save(root / "other.json")
    return path, refs, root


def run(path, trace):
    decoder = DecoderConfig(mode="overlap", trace=trace, cache_budget=0.25)
    engine = Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS), decoder=decoder))
    return [o.token_ids for o in engine.generate(PROMPTS, PARAMS)], engine.runtime


def test_the_trace_has_every_exact_pass_and_round_trips(setup, tmp_path):
    path, _, root = setup
    trace = RoutingTrace.load(root / "same.json")
    assert len(trace.passes) == 1 + PARAMS.max_new_tokens - 1  # one prefill pass, then one pass per further token
    layers = [layer for layer, _ in Engine(EngineConfig(model=path)).model.moe_blocks()]
    assert all(sorted(p) == layers and all(e == sorted(set(e)) for e in p.values()) for p in trace.passes)
    trace.save(tmp_path / "copy.json")
    assert RoutingTrace.load(tmp_path / "copy.json") == trace


def test_overlap_with_its_own_trace_is_exact_and_never_misses(setup):
    path, refs, root = setup
    tokens, runtime = run(path, root / "same.json")
    assert tokens == refs
    assert runtime.counters.misses == 0 and runtime.oracle.mismatches == 0
    assert runtime.counters.prefetched == runtime.counters.fetch_requests > 0


def test_overlap_with_another_runs_trace_stays_exact_and_counts_the_mismatch(setup):
    path, refs, root = setup
    tokens, runtime = run(path, root / "other.json")
    assert tokens == refs
    assert runtime.oracle.mismatches > 0 and runtime.counters.misses > 0


def test_overlap_is_labelled_an_oracle_and_needs_a_trace():
    assert "oracle" in MODES["overlap"].help and "upper bound" in MODES["overlap"].help
    with pytest.raises(ValueError, match="mode 'overlap' replays a recorded routing trace: give trace"):
        DecoderConfig(mode="overlap")


def test_the_cli_replays_a_trace_only_in_the_overlap_mode(capsys, tmp_path):
    from deploy.cli import main as cli

    assert cli(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "2", "--mode", "ondemand", "--trace", str(tmp_path)]) == 2
    assert "--trace is replayed by --mode overlap only, got --mode ondemand" in capsys.readouterr().err
