"""``specmoe prepare``: split a checkpoint into a dense part and per-expert shards.

Layout of a prepared directory::

    manifest.json                  what is where, with a CRC-32 of every expert tensor
    dense/                         a loadable model description without routed experts:
        config.json, generation_config.json, tokenizer files,
        model.safetensors          every non-expert parameter, under the engine's names
    experts/L003-E005.safetensors  layer 3, expert 5: "gate_up" [2I, H] and "down" [H, I]
                                   (plus "<name>.qdata"/"<name>.scales" with --quantize)

The checkpoint is read one tensor at a time through safetensors' memory map, so a
checkpoint larger than memory can be prepared. Re-running on the same model verifies what
is there and skips it; a directory prepared from another model is never overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specmoe.loader import DTYPES, read_config
from specmoe.models import model_class
from specmoe.quant import QuantizedTensor, quantize
from specmoe.weights import EXPERT_PARAM, Checkpoint, ExpertReader, match_name

FORMAT = "specmoe-shards/1"
UNFINISHED = "PREPARING"  # holds the model's fingerprint until the manifest is written
EXPERT_TENSORS = ("gate_up", "down")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "README.md")
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CorruptShardError(RuntimeError):
    """A shard's bytes do not match the manifest: names the file and the tensor."""


def crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())


def expert_file(layer: int, expert: int) -> str:
    return f"experts/L{layer:03d}-E{expert:03d}.safetensors"


def fingerprint(checkpoint: Checkpoint) -> str:
    """Identifies a source model by content: its config and every byte of its weight files.

    Names and shapes alone are not enough: two trainings of one architecture share them.
    The files are read in 16 MiB blocks, so hashing never holds a checkpoint in memory.
    """
    h = hashlib.blake2b((checkpoint.dir / "config.json").read_bytes(), digest_size=16)
    for file in sorted(set(checkpoint.files.values())):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
    return h.hexdigest()


@dataclass
class PrepareConfig:
    model_dir: Path
    out_dir: Path
    dtype: str | None = None  # None: keep the checkpoint's dtype
    quantize: str | None = None  # None | "int8" | "int4"
    group_size: int = 32

    def __post_init__(self):
        self.model_dir, self.out_dir = Path(self.model_dir), Path(self.out_dir)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unsupported --dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"unsupported --quantize {self.quantize!r}; allowed: int8, int4")


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Write (or verify) the prepared directory; returns the manifest."""
    config = read_config(cfg.model_dir)
    checkpoint = Checkpoint(cfg.model_dir)
    table = model_class(config.model_type).checkpoint_names
    model_id = fingerprint(checkpoint)
    manifest_path = cfg.out_dir / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("model") != model_id:
            raise ValueError(
                f"{cfg.out_dir} holds shards of another model (fingerprint {old.get('model')}, this one is {model_id}); "
                "choose an empty directory"
            )
        if (old.get("dtype_arg"), old.get("quantize"), old.get("group_size")) != (cfg.dtype, cfg.quantize, cfg.group_size):
            raise ValueError(
                f"{cfg.out_dir} was prepared with other options (dtype {old.get('dtype_arg')}, quantize "
                f"{old.get('quantize')}, group size {old.get('group_size')}); use them, or choose an empty directory"
            )
    elif cfg.out_dir.exists() and any(cfg.out_dir.iterdir()) and _unfinished(cfg.out_dir) != model_id:
        raise ValueError(f"{cfg.out_dir} is not empty and holds no manifest of this model; choose an empty directory")
    reader = ShardReader(cfg.out_dir) if manifest_path.exists() else None
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if reader is None:  # an interrupted run of the same model may start again here
        (cfg.out_dir / UNFINISHED).write_text(model_id + "\n")

    (cfg.out_dir / "experts").mkdir(parents=True, exist_ok=True)
    entries = []
    experts = ExpertReader(checkpoint, table)
    counts = {layer: _num_experts(config) for layer in experts.layers}
    keys = [(layer, e) for layer in experts.layers for e in range(counts[layer])]
    for layer, expert in _progress(keys, progress, "experts"):
        if reader is not None and reader.has(layer, expert):
            reader.verify(layer, expert)
            entries += reader.entries(layer, expert)
            continue
        entries += _write_expert(cfg, experts, layer, expert)
    dense = _write_dense(cfg, checkpoint, table)
    manifest = {
        "format": FORMAT,
        "model": model_id,
        "model_type": config.model_type,
        "dtype_arg": cfg.dtype,
        "quantize": cfg.quantize,
        "group_size": cfg.group_size,
        "experts": {str(layer): n for layer, n in counts.items()},
        "dense": dense,
        "tensors": entries,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)  # the manifest appears whole, and last
    (cfg.out_dir / UNFINISHED).unlink(missing_ok=True)
    return manifest


def _unfinished(out_dir: Path) -> str | None:
    """The fingerprint of the model an interrupted ``prepare`` was writing here, if any."""
    marker = out_dir / UNFINISHED
    return marker.read_text().strip() if marker.exists() else None


def _num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def _progress(items, enabled: bool, unit: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit=unit, file=sys.stderr, desc="prepare")


def _write_expert(cfg: PrepareConfig, experts: ExpertReader, layer: int, expert: int) -> list[dict]:
    tensors = dict(zip(EXPERT_TENSORS, experts.read(layer, expert)))
    if cfg.dtype is not None:
        tensors = {k: v.to(DTYPES[cfg.dtype]) for k, v in tensors.items()}
    out = {k: v.contiguous() for k, v in tensors.items()}
    if cfg.quantize is not None:
        bits = 8 if cfg.quantize == "int8" else 4
        for name in EXPERT_TENSORS:
            q = quantize(tensors[name], bits, cfg.group_size)
            out[f"{name}.qdata"], out[f"{name}.scales"] = q.data, q.scales
    file = expert_file(layer, expert)
    save_file(out, cfg.out_dir / file)
    return [_entry(layer, expert, name, file, t) for name, t in out.items()]


def _entry(layer: int, expert: int, name: str, file: str, t: torch.Tensor) -> dict:
    dtype = TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
    return {"layer": layer, "expert": expert, "name": name, "file": file, "dtype": dtype,
            "shape": list(t.shape), "nbytes": t.nbytes, "crc32": crc32(t)}


def _write_dense(cfg: PrepareConfig, checkpoint: Checkpoint, table) -> dict:
    dense_dir = cfg.out_dir / "dense"
    dense_dir.mkdir(exist_ok=True)
    for name in SIDE_FILES:
        if (cfg.model_dir / name).exists():
            shutil.copy(cfg.model_dir / name, dense_dir / name)
    tensors = {}
    for name in checkpoint.names():
        param = (match_name(name, table) or (name, None, "whole"))[0]
        if EXPERT_PARAM.match(param):
            continue
        t = checkpoint.read([name])[name]
        tensors[param] = t.to(DTYPES[cfg.dtype]) if cfg.dtype is not None else t
    save_file({k: v.contiguous() for k, v in tensors.items()}, dense_dir / "model.safetensors")
    return {"dir": "dense", "tensors": len(tensors), "nbytes": sum(t.nbytes for t in tensors.values())}


class ShardReader:
    """Reads experts from a prepared directory, checking each tensor against the manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise ValueError(f"{self.root} is not a prepared directory (no manifest.json); run `specmoe prepare` first")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest} has format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.index: dict[tuple[int, int], dict[str, dict]] = {}
        for entry in self.manifest["tensors"]:
            self.index.setdefault((entry["layer"], entry["expert"]), {})[entry["name"]] = entry

    @property
    def model(self) -> str:
        return self.manifest["model"]

    def config(self) -> dict:
        """The source model's config.json (copied into the dense part)."""
        return json.loads((self.root / "dense" / "config.json").read_text())

    def keys(self) -> list[tuple[int, int]]:
        return sorted(self.index)

    def has(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.index

    def entries(self, layer: int, expert: int) -> list[dict]:
        return list(self._entries(layer, expert).values())

    def _entries(self, layer: int, expert: int) -> dict[str, dict]:
        if (layer, expert) not in self.index:
            raise KeyError(f"no expert {expert} in layer {layer}; experts per layer: {self.manifest['experts']}")
        return self.index[(layer, expert)]

    def read_tensors(self, layer: int, expert: int, names=EXPERT_TENSORS, verify: bool = True) -> dict[str, torch.Tensor]:
        entries = self._entries(layer, expert)
        file = self.root / entries[names[0]]["file"]
        out = {}
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        except Exception as err:  # a truncated or unreadable file
            raise CorruptShardError(f"cannot read {file}: {err}") from err
        for name, t in out.items():
            entry = entries[name]
            if list(t.shape) != entry["shape"] or (verify and crc32(t) != entry["crc32"]):
                raise CorruptShardError(f"tensor {name!r} of layer {layer} expert {expert} in {file} does not match the manifest")
        return out

    def read(self, layer: int, expert: int, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.read_tensors(layer, expert, EXPERT_TENSORS, verify)
        return t["gate_up"], t["down"]

    def read_quantized(self, layer: int, expert: int) -> tuple[QuantizedTensor, QuantizedTensor]:
        bits = {"int8": 8, "int4": 4}[self.manifest["quantize"]]
        entries = self._entries(layer, expert)
        names = [f"{n}.{part}" for n in EXPERT_TENSORS for part in ("qdata", "scales")]
        t = self.read_tensors(layer, expert, names)
        return tuple(
            QuantizedTensor(t[f"{n}.qdata"], t[f"{n}.scales"], bits, self.manifest["group_size"], tuple(entries[n]["shape"]))
            for n in EXPERT_TENSORS
        )

    def verify(self, layer: int, expert: int) -> None:
        self.read_tensors(layer, expert, tuple(self._entries(layer, expert)))


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face checkpoint directory")
    parser.add_argument("out_dir", help="where to write the dense part, the expert shards and the manifest")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of stored copies (default: as in the checkpoint)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="also store group-wise quantized copies")
    parser.add_argument("--group-size", type=int, default=32)


def run_prepare(args: argparse.Namespace) -> int:
    cfg = PrepareConfig(args.model_dir, args.out_dir, args.dtype, args.quantize, args.group_size)
    manifest = prepare(cfg)
    total = sum(e["nbytes"] for e in manifest["tensors"])
    print(f"[specmoe] {len(manifest['tensors'])} expert tensors ({total / 2**20:.1f} MiB) and the dense part "
          f"({manifest['dense']['nbytes'] / 2**20:.1f} MiB) in {cfg.out_dir}", file=sys.stderr)
    return 0
