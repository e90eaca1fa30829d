"""Routing history (the activation-aware strategy's statistics): frequencies, transitions,
priority and prediction, computed by hand."""

import pytest
import torch

from specmoe.history import RoutingHistory


def idx(rows):
    return torch.tensor(rows)  # [N, K]


def test_frequency_counts_and_decays():
    h = RoutingHistory({0: 4, 1: 4}, decay=0.5)
    h.observe(0, idx([[0, 1], [0, 2]]))
    assert h.frequency[0].tolist() == [2, 1, 1, 0]
    h.observe(0, idx([[3, 1]]))
    assert h.frequency[0].tolist() == [1, 1.5, 0.5, 1]
    assert h.priority((0, 1)) == pytest.approx(1.5 / 4)
    assert h.priority((1, 0)) == 0.0  # layer never seen


def test_transition_follows_each_token_to_the_next_layer():
    h = RoutingHistory({0: 3, 2: 3}, decay=1.0)  # MoE layers 0 and 2 (a dense layer between)
    h.observe(0, idx([[0, 1], [2, 1]]))
    h.observe(2, idx([[2, 0], [1, 0]]))
    t = h.transition[0]
    # token 0: {0,1} -> {2,0}; token 1: {2,1} -> {1,0}
    assert t.tolist() == [[1, 0, 1], [2, 1, 1], [1, 1, 0]]


def test_prediction_is_conditional_on_the_current_routing():
    h = RoutingHistory({0: 4, 1: 4, 2: 4}, decay=1.0, prior=0.0)
    for _ in range(3):  # expert 0 leads to 1 then 2; expert 3 leads to 2 then 3
        h.observe(0, idx([[0], [3]]))
        h.observe(1, idx([[1], [2]]))
        h.observe(2, idx([[2], [3]]))
    assert h.predict(0, [0], depth=2, width=1) == {1: [1], 2: [2]}
    assert h.predict(0, [3], depth=2, width=1) == {1: [2], 2: [3]}
    assert h.predict(2, [0], depth=2, width=1) == {}  # no layer after the last


def test_no_history_predicts_nothing():
    h = RoutingHistory({0: 4, 1: 4})
    assert h.predict(0, [0, 1], depth=1, width=2) == {}


@pytest.mark.parametrize("kwargs", [{"decay": 0.0}, {"decay": 1.5}, {"prior": -1.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="history"):
        RoutingHistory({0: 2}, **kwargs)


# -- the remote mode: every non-resident expert runs where its weights are ----------------

from concurrent.futures import Future  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from specmoe.config import SHIPPED_MODEL, DecoderConfig, EngineConfig  # noqa: E402
from specmoe.engine import Engine  # noqa: E402
from specmoe.layers import expert_ffn  # noqa: E402
from specmoe.offload import checkpoint_fetcher  # noqa: E402
from specmoe.sampling import SamplingParams  # noqa: E402


class ComputingSource:
    """An in-process store that also runs an expert on activations it is sent."""

    def __init__(self, model_dir):
        self.fetch = checkpoint_fetcher(model_dir)
        self.computed = 0

    def __call__(self, layer, experts):
        return self.fetch(layer, experts)

    def compute(self, layer, expert, x):  # x [n, H] -> future of [n, H]
        gate_up, down = self.fetch(layer, [expert])[expert].result()
        self.computed += 1
        future = Future()
        future.set_result(expert_ffn(x, gate_up.to(x.dtype), down.to(x.dtype), F.silu))
        return future


def test_remote_mode_gives_resident_tokens_and_moves_no_expert_weights():
    # a long prompt: its prefill sends enough tokens to some experts that the remote_compute
    # cost model alone would move their weights instead
    prompts = [[(7 * i + 3) % 500 + 5 for i in range(200)], [300, 2, 41]]
    params = SamplingParams(max_new_tokens=12)
    want = [o.token_ids for o in Engine(EngineConfig(max_batch_size=2)).generate(prompts, params)]
    source = ComputingSource(SHIPPED_MODEL)
    engine = Engine(EngineConfig(max_batch_size=2, decoder=DecoderConfig(mode="remote")), fetch=source)
    assert [o.token_ids for o in engine.generate(prompts, params)] == want
    counters = engine.runtime.counters
    assert counters.remote_computes > 0 and source.computed == counters.remote_computes
    assert counters.misses == counters.remote_computes  # every miss ran on the store
    assert counters.bytes_moved == 0 and engine.runtime.startup_bytes == 0


def test_remote_mode_is_refused_without_a_computing_source():
    with pytest.raises(ValueError, match="mode 'remote' needs a source that can run experts"):
        Engine(EngineConfig(decoder=DecoderConfig(mode="remote")))


def test_history_mode_gives_resident_tokens_and_prefetches_from_history():
    prompts = [[5, 17, 99, 4], [300, 2, 41], [7, 7, 8]]
    params = SamplingParams(max_new_tokens=12)
    want = [o.token_ids for o in Engine(EngineConfig(max_batch_size=3)).generate(prompts, params)]
    engine = Engine(EngineConfig(max_batch_size=3, decoder=DecoderConfig(mode="history", cache_budget=0.25)),
                    fetch=checkpoint_fetcher(SHIPPED_MODEL))
    assert [o.token_ids for o in engine.generate(prompts, params)] == want
    history = engine.runtime.history
    assert engine.runtime.counters.prefetched > 0
    assert all(float(f.sum()) > 0 for f in history.frequency.values())  # every layer observed


def test_cache_priority_orders_eviction_and_refuses_a_less_likely_newcomer():
    from specmoe.expert_cache import ExpertCache

    score = {(0, 0): 0.5, (0, 1): 0.1, (0, 2): 0.9, (0, 3): 0.05}
    cache = ExpertCache(2, "lru")
    cache.priority = score.get
    cache.put((0, 1), "b", 1)
    cache.put((0, 0), "a", 1)
    cache.get((0, 1))  # LRU alone would evict (0, 0) next
    assert cache.put((0, 2), "c", 1) and (0, 1) not in cache and (0, 0) in cache
    assert not cache.put((0, 3), "d", 1) and set(cache.entries) == {(0, 0), (0, 2)}


@pytest.fixture(scope="module")
def grpc_store(tmp_path_factory):
    from actors.grpc_service import ExpertTable, ServerConfig, serve_experts
    from specmoe.shards import PrepareConfig, prepare

    shards = tmp_path_factory.mktemp("shards") / "shipped"
    prepare(PrepareConfig(SHIPPED_MODEL, shards), progress=False)
    server, port = serve_experts(ExpertTable(shards), ServerConfig(token="s3cret"))
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.cluster
def test_remote_mode_over_grpc_gives_resident_tokens(grpc_store):
    from actors.grpc_source import GrpcConfig, GrpcSource

    prompts = [[5, 17, 99, 4], [300, 2, 41]]
    params = SamplingParams(max_new_tokens=12)
    want = [o.token_ids for o in Engine(EngineConfig(max_batch_size=2)).generate(prompts, params)]
    source = GrpcSource([grpc_store], GrpcConfig(token="s3cret"))
    try:
        engine = Engine(EngineConfig(max_batch_size=2, decoder=DecoderConfig(mode="remote")), fetch=source)
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
        counters = engine.runtime.counters
        assert counters.remote_computes == counters.misses > 0 and counters.bytes_moved == 0
    finally:
        source.close()
