"""The hot draft policy's affinity table: per MoE layer, each expert's other experts, nearest first.

A draft pick that is not among the layer's pinned experts runs its nearest pinned expert
instead (``ExpertRuntime.substitute``); this table says which one is nearest. ``specmoe
prepare`` computes it once and writes it beside the manifest (``affinity.json``), so a
decoder loads a few kilobytes instead of moving every expert at start-up; a decoder with
no prepared directory (the in-process checkpoint source) computes it from the experts.

Distances between experts i and j of one layer (``DISTANCES``):

    router      1 - cosine similarity of the experts' router rows: experts the router sends
                similar tokens to stand in for each other. The default: of the distances
                here it gave the highest draft acceptance of the hot policy, averaged over the
                shipped model and shakespeare-moe-8x8 (bench/affinity.py; the margins are
                small, a few points over a random substitute), and it reads no expert at
                prepare time (only the router, [E, H] per layer).
    functional  mean over calibration inputs x of || f_i(x) - f_j(x) ||, f the expert's gated
                FFN; x = g * z, z ~ N(0, I) seeded (``CALIBRATION_SAMPLES`` of them), g the
                layer's post-attention RMSNorm gain: what the experts receive, in scale and
                per-channel weight
    routed      as functional, each input weighted by the router's probability for expert i
                (row i: the inputs i would receive); not symmetric
    l2          L2 distance of the flattened [gate_up; down] weights
    cosine      1 - cosine similarity of the flattened weights (the same order as L2 after
                scaling every expert to unit norm: ||a - b||^2 = 2 - 2 cos for unit a, b)

Every distance is computed in float64 on the CPU from seeded inputs, and ties go to the
lower expert id: the table is deterministic.

File format (``specmoe-affinity/1``): JSON with the distance, its calibration, and per layer
the number of experts and the order as base64 of an unsigned array [E, E-1] (uint8 when
E <= 256, else uint16, little-endian), row i the other experts of expert i nearest first:
128 experts take 16 KB per layer.

Letters: E experts of a layer, H hidden size, S calibration inputs, P flattened parameters.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specmoe.layers import activation, expert_ffn

FORMAT = "specmoe-affinity/1"
AFFINITY_FILE = "affinity.json"
DISTANCES = ("router", "functional", "routed", "l2", "cosine")
DEFAULT_DISTANCE = "router"
READS_NO_EXPERT = ("router",)  # distances computed from the dense part alone
CALIBRATION_SAMPLES = 256
CALIBRATION_SEED = 0

ExpertTensors = tuple[torch.Tensor, torch.Tensor]  # gate_up [2I, H], down [H, I]
Order = dict[int, list[int]]  # expert -> its other experts, nearest first


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def gain_name(layer: int) -> str:
    return f"model.layers.{layer}.post_attention_layernorm.weight"


@dataclass
class LayerContext:
    """What a distance may need beyond the experts' weights, for one layer."""

    router: torch.Tensor | None = None  # [E, H]
    gain: torch.Tensor | None = None  # [H]
    act: str = "silu"


@dataclass
class AffinityTable:
    """Per MoE layer, each expert's other experts nearest first, and the distance that ordered them."""

    distance: str
    layers: dict[int, Order] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "distance": self.distance,
            "calibration": {"samples": CALIBRATION_SAMPLES, "seed": CALIBRATION_SEED} if self.distance in ("functional", "routed") else None,
            "layers": {str(layer): _pack(order) for layer, order in sorted(self.layers.items())},
        }

    def save(self, path: str | Path) -> bytes:
        data = (json.dumps(self.to_json(), indent=1) + "\n").encode()
        Path(path).write_bytes(data)
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = "affinity table") -> AffinityTable:
        if data.get("format") != FORMAT:
            raise ValueError(f"{where} has format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(data["distance"], {int(layer): _unpack(packed) for layer, packed in data["layers"].items()})


def load_affinity(path: str | Path) -> AffinityTable:
    """The table of a prepared directory (the file its manifest names) or of an affinity.json."""
    path = Path(path)
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        if "affinity" not in manifest:
            raise ValueError(f"{path} was prepared without an affinity table; run `specmoe prepare` on it again to add one")
        path = path / manifest["affinity"]["file"]
    return AffinityTable.from_json(json.loads(path.read_text()), str(path))


def has_affinity(prepared: str | Path) -> bool:
    manifest = Path(prepared) / "manifest.json"
    return manifest.exists() and "affinity" in json.loads(manifest.read_text())


def _pack(order: Order) -> dict:
    ids = sorted(order)
    dtype = np.uint8 if len(ids) <= 256 else np.uint16
    rows = np.array([order[e] for e in ids], dtype=dtype).astype(np.dtype(dtype).newbyteorder("<"))  # [E, E-1]
    return {"experts": len(ids), "dtype": np.dtype(dtype).name, "order": base64.b64encode(rows.tobytes()).decode()}


def _unpack(packed: dict) -> Order:
    n = packed["experts"]
    raw = base64.b64decode(packed["order"])
    rows = np.frombuffer(raw, dtype=np.dtype(packed["dtype"]).newbyteorder("<")).reshape(n, n - 1)  # [E, E-1]
    return {e: rows[e].tolist() for e in range(n)}


# -- distances ------------------------------------------------------------------------------


def calibration_inputs(hidden: int, gain: torch.Tensor | None, samples: int = CALIBRATION_SAMPLES) -> torch.Tensor:
    """What a layer's experts receive, in scale: seeded unit-RMS inputs times the norm gain. -> [S, H]"""
    z = torch.randn(samples, hidden, generator=torch.Generator().manual_seed(CALIBRATION_SEED), dtype=torch.float64)
    return z * gain.detach().double().cpu() if gain is not None else z


def distance_matrix(read: Callable[[int], ExpertTensors], ids: list[int], distance: str, ctx: LayerContext) -> torch.Tensor:
    """Pairwise distances of one layer's experts (``read(e)`` gives expert e's weights). -> [E, E]

    The functional distance reads one expert at a time and keeps only its outputs [S, H].
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown affinity distance {distance!r}; allowed: {', '.join(DISTANCES)}")
    if distance == "router":
        if ctx.router is None:
            raise ValueError("the router distance needs the layer's router weights")
        return _cosine_distance(ctx.router.detach().double().cpu()[ids])
    if distance in ("functional", "routed"):
        if distance == "routed" and ctx.router is None:
            raise ValueError("the routed distance needs the layer's router weights")
        act = activation(ctx.act)
        hidden = ctx.gain.shape[0] if ctx.gain is not None else read(ids[0])[1].shape[0]
        x = calibration_inputs(hidden, ctx.gain)  # [S, H]
        out = torch.stack([expert_ffn(x, _f64(g), _f64(d), act) for g, d in map(read, ids)])  # [E, S, H]
        pair = torch.cdist(out.transpose(0, 1), out.transpose(0, 1))  # [S, E, E]
        if distance == "functional":
            return pair.mean(0)
        share = torch.softmax(x @ _f64(ctx.router)[ids].t(), dim=-1)  # [S, E]: how much the router sends x to each expert
        return (share[:, :, None] * pair).sum(0) / share.sum(0)[:, None]  # row i: inputs weighted by i's share
    flat = torch.stack([torch.cat([_f64(g).reshape(-1), _f64(d).reshape(-1)]) for g, d in map(read, ids)])  # [E, P]
    return torch.cdist(flat[None], flat[None])[0] if distance == "l2" else _cosine_distance(flat)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _cosine_distance(rows: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(rows, dim=-1)  # [E, D]
    return 1 - unit @ unit.t()  # [E, E]


def nearest_first(dist: torch.Tensor, ids: list[int]) -> Order:
    """Each expert's others ordered by ``dist`` [E, E], nearest first (ties: lower id)."""
    d = dist.tolist()
    return {e: [ids[j] for j in sorted(range(len(ids)), key=lambda j: (d[i][j], ids[j])) if j != i] for i, e in enumerate(ids)}


def expert_affinity(weights: dict[int, ExpertTensors], distance: str = DEFAULT_DISTANCE, ctx: LayerContext | None = None) -> Order:
    """One layer's order from its experts' weights (``weights``: expert -> (gate_up, down))."""
    ids = sorted(weights)
    return nearest_first(distance_matrix(weights.__getitem__, ids, distance, ctx or LayerContext()), ids)


def layer_context(params: dict[str, torch.Tensor], layer: int, act: str) -> LayerContext:
    """The router and norm gain of ``layer`` from engine-named parameters (absent ones stay None)."""
    return LayerContext(params.get(router_name(layer)), params.get(gain_name(layer)), act)


def build_table(read: Callable[[int, int], ExpertTensors], counts: dict[int, int], params: dict[str, torch.Tensor],
                act: str, distance: str = DEFAULT_DISTANCE) -> AffinityTable:
    """The whole model's table: ``counts`` maps each MoE layer to its number of experts."""
    table = AffinityTable(distance)
    for layer, n in sorted(counts.items()):
        ids = list(range(n))
        table.layers[layer] = nearest_first(
            distance_matrix(lambda e, layer=layer: read(layer, e), ids, distance, layer_context(params, layer, act)), ids)
    return table
