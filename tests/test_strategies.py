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
