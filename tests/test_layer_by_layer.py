"""Verification consumes a layer's experts as they arrive: those here first, then each one in
flight in arrival order, waiting only for this layer's; the output stays resident's bit for bit."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import torch

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_cache import ExpertCache
from specmoe.offload import ExpertRuntime, checkpoint_fetcher
from specmoe.sampling import SamplingParams


def weights_of(e: int):
    return torch.full((4, 2), float(e)), torch.full((2, 2), float(e))  # gate_up [2I, H], down [H, I]


def test_a_layer_runs_what_is_here_first_then_what_arrives_in_arrival_order():
    futures: dict[tuple[int, int], Future] = {}

    def fetch(layer: int, experts: list[int]) -> dict[int, Future]:
        made = {e: Future() for e in experts}
        futures.update({(layer, e): f for e, f in made.items()})
        return made

    cache = ExpertCache(10**6, "lru")
    runtime = ExpertRuntime(fetch, cache, {0: 4, 1: 4}, "resident")
    cache.put((0, 1), weights_of(1), 48)
    runtime.request(0, [2, 3], prefetch=True)
    runtime.request(1, [0], prefetch=True)  # the next layer's transfer, still in flight throughout
    futures[(0, 3)].set_result(weights_of(3))  # requested after expert 2, arrived before it
    runtime.counters.stall_s = 0.0
    threading.Timer(0.2, lambda: futures[(0, 2)].set_result(weights_of(2))).start()
    pairs = runtime.weights(0, {1: 2, 2: 1, 3: 1})
    order = [next(pairs)[0], next(pairs)[0]]  # neither waits: expert 2 has not arrived
    assert order == [1, 3] and runtime.counters.stall_s == 0 and not futures[(0, 2)].done()
    expert, (gate_up, _) = next(pairs)
    assert expert == 2 and torch.equal(gate_up, weights_of(2)[0])
    assert runtime.counters.stall_s >= 0.1  # blocked for expert 2 alone
    assert list(pairs) == []
    assert (1, 0) in runtime.in_flight and not futures[(1, 0)].done()  # layer 1 was never waited for


class ReversedSource:
    """Each request's experts delivered one by one in reverse order, on a timer thread: a layer's
    later-requested experts arrive first."""

    def __init__(self, model_dir, gap_s: float):
        self.read, self.gap_s = checkpoint_fetcher(model_dir), gap_s

    def __call__(self, layer: int, experts: list[int]) -> dict[int, Future]:
        read = {e: f.result() for e, f in self.read(layer, experts).items()}
        futures = {e: Future() for e in experts}
        for i, e in enumerate(reversed(experts)):
            timer = threading.Timer(self.gap_s * (i + 1), futures[e].set_result, (read[e],))
            timer.daemon = True
            timer.start()
        return futures


def test_arrival_order_leaves_the_tokens_unchanged(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    refs = [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=3)).generate(prompts, params)]
    decoder = DecoderConfig(mode="ondemand", cache_budget=0.25)
    engine = Engine(EngineConfig(model=path, max_batch_size=3, decoder=decoder), fetch=ReversedSource(path, 0.005))
    runtime, weights = engine.runtime, engine.runtime.weights
    orders = []

    def recorded(layer, tokens):
        pairs = list(weights(layer, tokens))
        orders.append([e for e, _ in pairs])
        return pairs

    runtime.weights = recorded
    started = time.perf_counter()
    assert [o.token_ids for o in engine.generate(prompts, params)] == refs
    assert any(order != sorted(order) for order in orders)  # experts did run out of expert order
    assert 0 < runtime.counters.stall_s <= time.perf_counter() - started
