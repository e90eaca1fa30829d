"""The speculation vocabulary and the accept rules.

Words used everywhere (code, metrics, logs, docs) with exactly these meanings:

* **draft** - the k tokens a sequence proposes in one round, decoded by the model itself in
  draft routing (non-resident experts replaced by the draft policy, so no bytes move).
* **accepted** - the longest prefix of the draft that verification keeps (0..k tokens).
* **bonus** - the one token verification adds after the accepted prefix: the target's own
  token at the first rejected position, or one past the draft when all k were accepted.
  A round therefore yields ``accepted + 1`` tokens.
* **rollback** - truncating a sequence's KV cache to its accepted length, dropping the
  entries of rejected draft tokens.
* **predicted set** - per layer, the experts the draft's unrestricted router chose over
  the batch and the draft tokens; what verification is expected to need.
* **miss** - an expert verification needed that was neither resident nor predicted (nor in
  flight): fetched on demand, and the pass stalls on it.

Shapes: B sequences, k draft tokens (rows padded with ``-1`` where a sequence drafted fewer),
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmoe.sampling import SamplingParams, keyed_choice, probabilities

PAD = -1


@dataclass
class Verdict:
    """The outcome of verifying one round: per sequence, accepted count and the bonus token."""

    accepted: list[int]
    bonus: list[int]

    def tokens(self, drafts: list[list[int]]) -> list[list[int]]:
        """The tokens each sequence gains: its accepted draft tokens, then the bonus."""
        return [d[:a] + [b] for d, a, b in zip(drafts, self.accepted, self.bonus)]


def pad_drafts(drafts: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    k = max((len(d) for d in drafts), default=0)
    return torch.tensor([d + [PAD] * (k - len(d)) for d in drafts], dtype=torch.long, device=device).reshape(len(drafts), k)


def accept_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Greedy verification: keep the longest draft prefix equal to the target's argmax, plus one.

    draft [B, k] (PAD-padded), target_logits [B, k+1, V] -> Verdict.
        target_j = argmax target_logits[:, j]
        accepted = max{a : draft_i == target_i for all i < a}
        bonus    = target_accepted
    """
    target = target_logits.argmax(dim=-1)  # [B, k+1]
    k = draft.shape[1]
    match = (draft == target[:, :k]).long()  # [B, k]; PAD never matches
    accepted = match.cumprod(dim=1).sum(dim=1)  # [B]
    bonus = target.gather(1, accepted[:, None])[:, 0]  # [B]
    return Verdict(accepted.tolist(), bonus.tolist())  # sync: the scheduler needs the counts


def accept_sampled(
    draft: torch.Tensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    noise: list[torch.Tensor | None] | None = None,
) -> Verdict:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023), or, for rows
    with ``noise``, its drafter-invariant form.

    draft [B, k], draft_probs [B, k, V] (q, the distribution each draft token was drawn from),
    target_logits [B, k+1, V]. For each draft token d_j with target p_j and draft q_j:
        accept with probability min(1, p_j(d_j) / q_j(d_j));
        at the first rejection the bonus is drawn from norm(max(0, p_j - q_j));
        if all are accepted the bonus is drawn from p_k.
    The emitted tokens are distributed exactly as sampling from the target alone. Greedy rows
    (temperature 0) fall back to ``accept_greedy``'s rule.

    A row with ``noise[row]`` ([k+1, V]: ``sampling.position_noise`` of each position, the
    noise its draft was drawn with) is checked by the Gumbel-max coupling instead (Daliri,
    Musco and Suresh 2024, "drafter-invariant speculative decoding"):
        target_j = argmax(log p_j + g_j);  accepted = max{a : draft_i == target_i for all i < a};
        bonus = target_accepted.
    Every emitted token is then the target's own Gumbel-max draw for its position, exactly
    distributed as p, and the same whatever the draft was: what makes a seeded request
    reproducible however k was chosen. (It accepts somewhat less often than the rejection rule.)
    """
    accepted, bonus = [], []
    for row, (p_row, gen) in enumerate(zip(params, generators)):
        if p_row.greedy:
            verdict = accept_greedy(draft[row : row + 1], target_logits[row : row + 1])
            accepted.append(verdict.accepted[0])
            bonus.append(verdict.bonus[0])
            continue
        target = probabilities(target_logits[row], p_row).cpu()  # [k+1, V]; sync: host generators
        g = noise[row] if noise is not None else None
        if g is not None:
            a, token = _accept_row_coupled(draft[row].tolist(), target, g)
            accepted.append(a)
            bonus.append(token)
            continue
        q = draft_probs[row].float().cpu()  # [k, V]
        a, token = _accept_row(draft[row].tolist(), q, target, gen)
        accepted.append(a)
        bonus.append(token)
    return Verdict(accepted, bonus)


def _accept_row_coupled(draft: list[int], p: torch.Tensor, noise: torch.Tensor) -> tuple[int, int]:
    drafted = sum(1 for t in draft if t != PAD)
    target = keyed_choice(p[: drafted + 1], noise[: drafted + 1]).tolist()  # [drafted+1]
    a = 0
    while a < drafted and draft[a] == target[a]:
        a += 1
    return a, target[a]


def _accept_row(draft: list[int], q: torch.Tensor, p: torch.Tensor, gen: torch.Generator | None) -> tuple[int, int]:
    for j, token in enumerate(draft):
        if token == PAD:
            break
        ratio = p[j, token] / q[j, token].clamp_min(1e-30)
        if torch.rand((), generator=gen) < ratio:
            continue
        residual = (p[j] - q[j]).clamp_min(0)  # [V]
        if residual.sum() <= 0:  # p == q: any rejection is measure-zero; sample the target
            residual = p[j]
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    j = sum(1 for t in draft if t != PAD)
    return j, int(torch.multinomial(p[j], 1, generator=gen))
