"""Choosing k, the number of draft tokens per round, from a cost model of the round.

With acceptance rate a (the chance that a draft token is accepted, given the ones before it
were), a round with k draft tokens yields on average

    E(k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

tokens per sequence. For B running sequences the round verifies n = B(k+1) positions and costs

    k = 0:  T(0) = C(0) + X(f(n)) + latency * min(f(n), layers)        (every fetch a stall)
    k > 0:  T(k) = D(k) + C(k) + max(0, X(f_p) + latency - D_o(k)) + X(f_m) + latency * min(f_m, layers)

where D(k) = (k+1) * t_draft (the draft takes one extra step to route its last token), C(k)
is the verification's compute (its wall time less its stalls), f(n) the experts the round
moves, split into f_p = (1 - m) f(n) predicted by the draft (requested while it drafts: D_o(k)
= D(k) with eager migration, 0 with deferred) and f_m = m f(n) that verification misses, and
X(f) = f * bytes per expert / bandwidth. The controller picks the k in [0, k_max] with the
highest E(k) / T(k); k = 0 is plain decoding and wins when drafting does not pay.

Every quantity is measured (exponential moving averages):

* acceptance, from the accepted draft tokens of recent rounds (a geometric rate, the prior
  counting as one draft token);
* t_draft per draft step, C(k) per k (linearly interpolated between measured k; a prior slope
  before two are known), the miss share m;
* f(n) = M (1 - (1 - q)^n): M is the number of experts the cache cannot hold, q the chance
  that one position needs a given one of them, fitted per k to the experts each round moved
  (prior: top-k / experts, uniform routing);
* bandwidth and latency from the transfers the runtime has seen (request and delivery times
  and bytes; ``LinkEstimate``), starting from an emulated link's configured figures where the
  source is one.

Now and then it tries another k (k = 1 when plain decoding is best, else a neighbour of its
choice) so its estimates stay fresh: within ``explore_every`` rounds of a change of choice,
then twice as long apart each time the choice holds, up to 8 x ``explore_every``; one round in
``explore_every`` at most is what a losing k can cost. The choice never changes which tokens
come out, only how fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LinkEstimate:
    """The expert link's seconds per byte and per-request latency, from delivered transfers.

    A FIFO link's transfer starts when its request's latency has passed and the previous
    delivery is done; its service time (delivery less that start) over its bytes is the
    inverse bandwidth. Latency is the least delay of a round's transfers (delivery less
    request, less the service time at the estimated bandwidth): queueing only adds to a delay,
    so the least one is the transfer that waited for nothing else.
    """

    seconds_per_byte: float = 0.0
    latency_s: float = 0.0
    smoothing: float = 0.2
    measured: bool = False
    last_delivery: float = float("-inf")

    def observe(self, deliveries: list[tuple[float, float, int]]) -> None:
        """``deliveries``: (requested_at, delivered_at, bytes) per transfer, perf_counter times."""
        busy_s, moved = 0.0, 0
        delays = [max(0.0, delivered - requested - nbytes * self.seconds_per_byte) for requested, delivered, nbytes in deliveries]
        for requested, delivered, nbytes in sorted(deliveries, key=lambda d: d[1]):
            busy_s += max(0.0, delivered - max(requested + self.latency_s, self.last_delivery))
            moved += nbytes
            self.last_delivery = max(self.last_delivery, delivered)
        s = self.smoothing
        if moved:
            self.seconds_per_byte = (1 - s) * self.seconds_per_byte + s * busy_s / moved
        if delays:
            self.latency_s = (1 - s) * self.latency_s + s * min(delays)
        self.measured = self.measured or bool(moved)


@dataclass
class ExpertTraffic:
    """What the cost model knows of a decoder's experts: fixed by the model and the cache."""

    expert_bytes: int  # one expert as a transfer moves it (the runtime's size, then the deliveries' mean)
    nonresident: int  # M: experts (layer, expert) the cache cannot hold
    layers: int  # MoE layers
    need_prior: float  # q before any round is seen: top-k / experts per layer


@dataclass
class RoundTraffic:
    """One round's transfers, as the runtime counted them (``Engine._adapt`` fills it)."""

    positions: int  # verified positions of running sequences: sum of (draft tokens + 1)
    fetched: int  # experts requested this round (predicted and missed)
    missed: int  # of them, needed by verification and not requested before
    stall_s: float  # time verification was blocked on transfers
    deliveries: list[tuple[float, float, int]] = field(default_factory=list)
    prefill: bool = False  # a sequence prefilled in this round: its timings say nothing of k


@dataclass
class SpeculationController:
    k_max: int = 16
    fixed_k: int | None = None  # None = adaptive
    smoothing: float = 0.2
    explore_every: int = 16
    overlap: bool = True  # eager migration: transfers of predicted experts overlap drafting
    acceptance: float = 0.8  # the estimate; its starting value is the prior
    prior_weight: float = 1.0  # the prior counts as this many draft tokens
    memory: float = 0.9  # acceptance counts kept a round (about ten rounds remembered)
    draft_step_s: float | None = None
    compute_s: dict[int, float] = field(default_factory=dict)  # C(k): verification less its stalls
    compute_slope_prior: float = 0.25  # C(k) = C(0) (1 + slope k) until a second k is measured
    traffic: ExpertTraffic | None = None  # None: experts are local, rounds move nothing
    link: LinkEstimate = field(default_factory=LinkEstimate)
    need: dict[int, float] = field(default_factory=dict)  # q per k, fitted
    miss_share: float = 0.2  # m: prior, replaced by measurements
    sequences: int = 1  # B, as in the last round
    rounds: int = 0
    best: int | None = None  # the last choice the model made
    since: int = 0  # decisions since the last exploration
    interval: int | None = None  # decisions between explorations now
    explorations: int = 0
    pending: RoundTraffic | None = None  # what ``observe`` saw for the round ``update`` closes
    trials: tuple[float, float] = (0.0, 0.0)  # (accepted, trials), decayed by ``memory`` a round
    prior: float | None = None  # the starting acceptance

    def __post_init__(self):
        if not isinstance(self.k_max, int) or self.k_max < 0:
            raise ValueError(f"k_max must be an integer >= 0, got {self.k_max!r}")
        if self.fixed_k is not None and not 0 <= self.fixed_k <= self.k_max:
            raise ValueError(f"k must be in [0, k_max={self.k_max}], got {self.fixed_k}")
        if not isinstance(self.explore_every, int) or self.explore_every < 2:
            raise ValueError(f"explore_every must be an integer >= 2, got {self.explore_every!r}")
        if not 0 <= self.acceptance <= 1:
            raise ValueError(f"acceptance must be in [0, 1], got {self.acceptance!r}")
        self.prior = self.acceptance if self.prior is None else self.prior

    # -- choosing ---------------------------------------------------------------------------

    def choose(self) -> int:
        if self.fixed_k is not None:
            return self.fixed_k
        if 0 not in self.compute_s:
            return 0  # plain decoding first: it measures C(0) and the transfers at no risk
        best = max(range(self.k_max + 1), key=self.rate)
        if best != self.best or self.interval is None:  # a new choice: explore around it soon
            self.best, self.interval = best, self.explore_every
        self.since += 1
        if self.since < self.interval:
            return best
        self.since, self.explorations = 0, self.explorations + 1
        self.interval = min(2 * self.interval, 8 * self.explore_every)  # the choice held: explore less
        if best == 0:
            return min(1, self.k_max)
        up = self.explorations % 2 == 1
        return min(self.k_max, best + 1) if up and best < self.k_max else best - 1

    def rate(self, k: int) -> float:
        """Expected tokens per second per sequence for a round with k draft tokens."""
        return self.expected_tokens(k) / max(self.round_s(k), 1e-9)

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def round_s(self, k: int) -> float:
        """T(k), as in the module docstring."""
        fetched = self.fetched(k)
        latency, layers = self.link.latency_s, self.traffic.layers if self.traffic else 0
        if k == 0:
            return self.compute_cost(0) + self.transfer_s(fetched) + latency * min(fetched, layers)
        missed = self.miss_share * fetched
        draft = (k + 1) * self.draft_cost()
        predicted = self.transfer_s(fetched - missed) + (latency if fetched > missed else 0.0)
        stall = max(0.0, predicted - (draft if self.overlap else 0.0))
        return draft + self.compute_cost(k) + stall + self.transfer_s(missed) + latency * min(missed, layers)

    def fetched(self, k: int) -> float:
        """f(n): experts a round over n = B(k+1) positions moves."""
        if self.traffic is None or not self.traffic.nonresident:
            return 0.0
        return self.traffic.nonresident * (1 - (1 - self.need_at(k)) ** (self.sequences * (k + 1)))

    def need_at(self, k: int) -> float:
        """q for k: measured, else the nearest measured k below (the positions of one sequence are
        correlated, so q falls as k grows: this overestimates the bytes), else the prior."""
        if k in self.need:
            return self.need[k]
        below = [j for j in self.need if j < k]
        if below:
            return self.need[max(below)]
        return self.need[min(self.need)] if self.need else self.traffic.need_prior

    def transfer_s(self, experts: float) -> float:
        return experts * (self.traffic.expert_bytes if self.traffic else 0) * self.link.seconds_per_byte

    def draft_cost(self) -> float:
        """t_draft; before a draft is measured, one plain decoding step's compute."""
        return self.draft_step_s if self.draft_step_s is not None else self.compute_cost(0)

    def compute_cost(self, k: int) -> float:
        if k in self.compute_s:
            return self.compute_s[k]
        known = sorted(self.compute_s)
        if not known:
            return 0.0
        if len(known) == 1:
            base = self.compute_s[known[0]]
            return base * (1 + self.compute_slope_prior * k) / (1 + self.compute_slope_prior * known[0])
        lo = max([j for j in known if j < k], default=known[0])
        hi = min([j for j in known if j > k], default=known[-1])
        if lo == hi:
            lo, hi = (known[-2], known[-1]) if k > known[-1] else (known[0], known[1])
        slope = max(0.0, (self.compute_s[hi] - self.compute_s[lo]) / (hi - lo))
        return max(self.compute_s[lo] + slope * (k - lo), 1e-9)

    # -- learning ---------------------------------------------------------------------------

    def observe(self, traffic: RoundTraffic) -> None:
        """The round's transfers; the next ``update`` closes the round with its timings."""
        self.link.observe(traffic.deliveries)
        self.pending = traffic

    def update(self, k: int, drafted: list[int], accepted: list[int], draft_s: float, verify_s: float) -> None:
        """Record one round: per sequence, draft tokens proposed and accepted; and its timings.

        Acceptance is estimated as a geometric rate: each sequence contributes its accepted
        tokens as successes and, if it stopped short of its draft, one failure; counts decay
        by ``memory`` a round, and the prior counts as ``prior_weight`` trials. A round in
        which a sequence prefilled teaches acceptance only.
        """
        self.rounds += 1
        trials = sum(a + (a < d) for d, a in zip(drafted, accepted))
        if trials:
            keep = self.memory
            successes, total = keep * self.trials[0] + sum(accepted), keep * self.trials[1] + trials
            self.trials = (successes, total)
            self.acceptance = (successes + self.prior_weight * self.prior) / (total + self.prior_weight)
        traffic, self.pending = self.pending, None
        if traffic is not None and traffic.prefill:
            return
        self.sequences = max(1, len(drafted))
        steps = max(drafted, default=0) + 1 if k else 0  # the draft's forward passes
        if steps:
            self.draft_step_s = self._ema(self.draft_step_s, draft_s / steps)
        stall = traffic.stall_s if traffic is not None else 0.0
        self.compute_s[k] = self._ema(self.compute_s.get(k), max(verify_s - stall, 0.0))
        if traffic is not None:
            self._learn_traffic(k, traffic)

    def _learn_traffic(self, k: int, traffic: RoundTraffic) -> None:
        m = self.traffic.nonresident if self.traffic else 0
        if self.traffic and traffic.deliveries:
            self.traffic.expert_bytes = round(sum(d[2] for d in traffic.deliveries) / len(traffic.deliveries))
        if m and traffic.positions:
            share = min(traffic.fetched / m, 0.999)
            self.need[k] = self._ema(self.need.get(k), 1 - (1 - share) ** (1 / traffic.positions))
        if k and traffic.fetched:
            self.miss_share = self._ema(self.miss_share, traffic.missed / traffic.fetched)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new
