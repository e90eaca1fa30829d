"""Loading Hugging Face safetensors checkpoints by name.

A family declares a table of ``WeightName`` rows that map checkpoint tensor names (with
``{l}`` for the layer and ``{e}`` for the expert) onto our parameter names, which are
transformers v5's. A checkpoint name that no row matches must be a parameter name itself
(this is how v5's fused ``mlp.experts.gate_up_proj`` loads). Anything missing or unused is
an error that names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

# Where a checkpoint tensor lands in its parameter:
#   whole  - the full parameter
#   expert - param[e]                       (down_proj [E, H, I])
#   gate   - param[e, :I]  of gate_up_proj  [E, 2I, H]
#   up     - param[e, I:]
PARTS = ("whole", "expert", "gate", "up")
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: the message names what is wrong."""


@dataclass(frozen=True)
class WeightName:
    checkpoint: str
    param: str
    part: str = "whole"

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"unknown part {self.part!r}; allowed: {PARTS}")

    def pattern(self) -> re.Pattern:
        regex = re.escape(self.checkpoint).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile(regex + "$")


def read_json(path: Path):
    """A JSON file's content; a file that is not valid JSON is named in the error."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {err}") from None


def header_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file, after safetensors checked that its data is whole."""
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as err:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {err}") from None


class Checkpoint:
    """The tensors of a local checkpoint directory, single-file or sharded, read lazily."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory {str(self.dir)!r} does not exist")
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            weight_map = read_json(index)["weight_map"]
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in header_names(single)}
        else:
            raise CheckpointError(
                f"no weights in {str(self.dir)!r}: expected model.safetensors or model.safetensors.index.json"
            )
        for file in set(self.files.values()):
            if not file.exists():
                raise CheckpointError(f"checkpoint shard {file.name!r} listed in the index is missing")
            if index.exists():
                header_names(file)  # a truncated shard fails here, named, not halfway through loading

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out


def match_name(name: str, table: tuple[WeightName, ...]) -> tuple[str, int | None, str] | None:
    """Checkpoint name -> (parameter name, expert or None, part), or None if no row matches."""
    for row in table:
        m = row.pattern().match(name)
        if m:
            groups = m.groupdict()
            param = row.param.replace("{l}", groups.get("l", ""))
            expert = int(groups["e"]) if "e" in groups else None
            return param, expert, row.part
    return None


def target_slice(param: torch.Tensor, expert: int | None, part: str) -> torch.Tensor:
    if part == "whole":
        return param
    if expert is None or not 0 <= expert < param.shape[0]:
        raise CheckpointError(f"expert index {expert} out of range for {param.shape[0]} experts")
    if part == "expert":
        return param[expert]
    half = param.shape[1] // 2
    return param[expert, :half] if part == "gate" else param[expert, half:]


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    table: tuple[WeightName, ...],
    dtype: torch.dtype,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Fill ``model``'s parameters from ``checkpoint``; raise CheckpointError naming any mismatch.

    Parameters named in ``skip`` are neither read nor required (a decoder's remote experts).
    """
    params = {name: p for name, p in model.named_parameters() if name not in skip}
    tied = getattr(model, "tied_names", {})
    plan, unexpected = [], []
    for name in checkpoint.names():
        if any(p.match(name) for p in IGNORED) or name in tied:
            continue
        target = match_name(name, table) or ((name, None, "whole") if name in params or name in skip else None)
        if target is not None and target[0] in skip:
            continue
        if target is None or target[0] not in params:
            unexpected.append(name)
        else:
            plan.append((name, *target))
    if unexpected:
        raise CheckpointError(f"unexpected tensors in checkpoint (not used by the model): {sorted(unexpected)}")

    filled: dict[str, set] = {}
    tensors = checkpoint.read([name for name, *_ in plan])
    with torch.no_grad():
        for name, param_name, expert, part in plan:
            dest = target_slice(params[param_name], expert, part)
            src = tensors.pop(name)
            if tuple(src.shape) != tuple(dest.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(src.shape)}, the model expects {tuple(dest.shape)}"
                )
            dest.copy_(src.to(dtype))
            filled.setdefault(param_name, set()).add((expert, part))

    missing = [m for p_name, p in params.items() if p_name not in tied for m in missing_names(p_name, p, filled, table)]
    if missing:
        raise CheckpointError(f"tensors missing from checkpoint: {missing}")


def missing_names(param_name: str, param: torch.Tensor, filled: dict[str, set], table) -> list[str]:
    """Names still needed to fill ``param_name``: ours, with the checkpoint convention's in brackets."""
    got = filled.get(param_name, set())
    if (None, "whole") in got:
        return []
    rows = [row for row in table if _param_matches(row.param, param_name)]
    pieces = [(e, row) for row in rows if row.part != "whole" for e in range(param.shape[0])]
    if got:  # per-expert tensors were given, some are not
        return [_render(row, param_name, e) for e, row in pieces if (e, row.part) not in got]
    alternatives = [_render(row, param_name, 0) for row in rows]
    return [f"{param_name} (or {', '.join(alternatives)}{' ...' if pieces else ''})" if rows else param_name]


def _param_matches(template: str, name: str) -> bool:
    return re.fullmatch(re.escape(template).replace(r"\{l\}", r"\d+"), name) is not None


def _render(row: WeightName, param_name: str, expert: int) -> str:
    layer = re.search(r"layers\.(\d+)\.", param_name)
    return row.checkpoint.replace("{l}", layer.group(1) if layer else "").replace("{e}", str(expert))


EXPERT_PARAM = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=0)`` for 2-D tensors of one dtype, through numpy: sources read
    experts on background threads, where a torch kernel would start its own OpenMP team."""
    import numpy as np

    raw = [p.contiguous().view(torch.uint8).numpy() for p in parts]  # [rows, cols * itemsize] each
    return torch.from_numpy(np.concatenate(raw, axis=0)).view(parts[0].dtype)


class ExpertReader:
    """Reads one routed expert at a time from a checkpoint, in the engine's layout:
    ``(gate_up [2I, H], down [H, I])``, whichever naming the checkpoint uses.

    Fused tensors are sliced through safetensors' memory map, so reading an expert never
    loads its layer's other experts.
    """

    def __init__(self, checkpoint: Checkpoint, table: tuple[WeightName, ...]):
        self.checkpoint = checkpoint
        # (layer, param) -> [(checkpoint name, expert or None, part)]
        self.sources: dict[tuple[int, str], list[tuple[str, int | None, str]]] = {}
        for name in checkpoint.names():
            target = match_name(name, table) or (name, None, "whole")
            m = EXPERT_PARAM.match(target[0])
            if m:
                self.sources.setdefault((int(m.group(1)), m.group(2)), []).append((name, target[1], target[2]))
        self.layers = sorted({layer for layer, _ in self.sources})

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (layer, "gate_up_proj") not in self.sources:
            raise KeyError(f"layer {layer} has no routed experts in this checkpoint; layers with experts: {self.layers}")
        return self._param(layer, "gate_up_proj", expert), self._param(layer, "down_proj", expert)

    def _param(self, layer: int, param: str, expert: int) -> torch.Tensor:
        parts = {}
        for name, e, part in self.sources[(layer, param)]:
            if part == "whole":
                with safe_open(self.checkpoint.files[name], framework="pt") as f:
                    stacked = f.get_slice(name)
                    if not 0 <= expert < stacked.get_shape()[0]:
                        raise KeyError(f"expert {expert} out of range for {name} with {stacked.get_shape()[0]} experts")
                    return stacked[expert]
            if e == expert:
                parts[part] = name
        if not parts:
            raise KeyError(f"expert {expert} of layer {layer} is not in this checkpoint")
        tensors = self.checkpoint.read(list(parts.values()))
        if param == "down_proj":
            return tensors[parts["expert"]]
        return cat_rows([tensors[parts["gate"]], tensors[parts["up"]]])
