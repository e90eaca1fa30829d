"""Choosing k, the number of draft tokens per round, to maximise tokens per second.

With acceptance rate a (the chance that a draft token is accepted, given the ones before it
were), a round with k draft tokens yields on average

    E(k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

tokens per sequence and costs ``k * t_draft + t_verify(k)``, where t_draft is one draft step
and t_verify(k) one verification pass over k+1 positions per sequence, transfers and stalls
included. Both costs are measured (exponential moving averages per k); k = 0 is plain
decoding, which the controller picks when speculation does not pay. Every ``explore_every``
rounds it tries a neighbour of its choice so its cost estimates stay fresh. The choice is
deterministic: it never changes which tokens come out, only how fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculationController:
    k_max: int = 4
    fixed_k: int | None = None  # None = adaptive
    smoothing: float = 0.2
    explore_every: int = 8
    acceptance: float = 0.8  # prior, replaced by measurements
    draft_step_s: float | None = None
    verify_s: dict[int, float] = field(default_factory=dict)
    rounds: int = 0

    def __post_init__(self):
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
        if self.fixed_k is not None and not 0 <= self.fixed_k <= self.k_max:
            raise ValueError(f"k must be in [0, k_max={self.k_max}], got {self.fixed_k}")

    def choose(self) -> int:
        if self.fixed_k is not None:
            return self.fixed_k
        if self.draft_step_s is None or not self.verify_s:
            return self.k_max  # measure the most speculative round first
        best = max(range(self.k_max + 1), key=self.rate)
        if self.rounds % self.explore_every == self.explore_every - 1:
            return min(self.k_max, best + 1) if best < self.k_max else best - 1
        return best

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def verify_cost(self, k: int) -> float:
        if k in self.verify_s:
            return self.verify_s[k]
        known = sorted(self.verify_s)
        if len(known) == 1:
            return self.verify_s[known[0]]
        lo = max([j for j in known if j < k], default=known[0])
        hi = min([j for j in known if j > k], default=known[-1])
        if lo == hi:
            lo, hi = known[-2], known[-1]
        slope = (self.verify_s[hi] - self.verify_s[lo]) / (hi - lo)
        return max(self.verify_s[lo] + slope * (k - lo), 1e-9)

    def rate(self, k: int) -> float:
        """Expected tokens per second per sequence for a round with k draft tokens."""
        cost = k * (self.draft_step_s or 0.0) + self.verify_cost(k)
        return self.expected_tokens(k) / max(cost, 1e-9)

    def update(self, k: int, drafted: list[int], accepted: list[int], draft_s: float, verify_s: float) -> None:
        """Record one round: per sequence, draft tokens proposed and accepted; and its timings.

        Acceptance is estimated as a geometric rate: each sequence contributes its accepted
        tokens as successes and, if it stopped short of its draft, one failure.
        """
        self.rounds += 1
        s = self.smoothing
        trials = sum(a + (a < d) for d, a in zip(drafted, accepted))
        if trials:
            self.acceptance = (1 - s) * self.acceptance + s * (sum(accepted) / trials)
        if k:
            step = draft_s / k
            self.draft_step_s = step if self.draft_step_s is None else (1 - s) * self.draft_step_s + s * step
        old = self.verify_s.get(k)
        self.verify_s[k] = verify_s if old is None else (1 - s) * old + s * verify_s
