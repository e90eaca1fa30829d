"""``specmoe prepare``: split a checkpoint into a dense part and per-expert shards.

Layout of a prepared directory::

    manifest.json                  what is where, with a CRC-32 of every expert tensor
    dense/                         a loadable model description without routed experts:
        config.json, generation_config.json, tokenizer files,
        model.safetensors          every non-expert parameter, under the engine's names
    experts/L003-E005.safetensors  layer 3, expert 5: "gate_up" [2I, H] and "down" [H, I]
                                   (plus "<name>.qdata"/"<name>.scales" with --quantize)
    affinity.json                  the hot draft policy's table: per layer, each expert's others
                                   nearest first (``specmoe.affinity``; the manifest names its
                                   distance and CRC-32)

The checkpoint is read one tensor at a time through safetensors' memory map, so a
checkpoint larger than memory can be prepared. Every file is written to a temporary name
and renamed, so none is ever seen half-written. Re-running on the same model verifies
every shard (CRC-32) and rewrites only the ones that do not match; an interrupted run
resumes from the shards it recorded in ``PREPARING``; the dense part is rewritten only
when it differs. A directory prepared from another model is never overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shlex
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from specmoe.affinity import AFFINITY_FILE, DEFAULT_DISTANCE, DISTANCES, build_table, gain_name, router_name
from specmoe.loader import DTYPES, read_config
from specmoe.models import model_class
from specmoe.quant import QuantizedTensor, quantize
from specmoe.weights import EXPERT_PARAM, Checkpoint, ExpertReader, match_name

FORMAT = "specmoe-shards/1"
UNFINISHED = "PREPARING"  # the model's fingerprint, then a journal line per shard written, until the manifest is
EXPERT_TENSORS = ("gate_up", "down")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "README.md")
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CorruptShardError(RuntimeError):
    """A shard's bytes do not match the manifest: names the file, the tensor, and the command that rewrites it."""


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
    affinity_distance: str = DEFAULT_DISTANCE  # how the affinity table orders experts (specmoe.affinity)

    def __post_init__(self):
        self.model_dir, self.out_dir = Path(self.model_dir), Path(self.out_dir)
        if self.affinity_distance not in DISTANCES:
            raise ValueError(f"unsupported --affinity-distance {self.affinity_distance!r}; allowed: {', '.join(DISTANCES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unsupported --dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"unsupported --quantize {self.quantize!r}; allowed: int8, int4")


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Write, resume or repair the prepared directory; returns the manifest.

    Shards already there (from the manifest, or the journal of an interrupted run) are
    checked against their CRC-32 and kept; missing or corrupt ones are written again.
    """
    config = read_config(cfg.model_dir)
    checkpoint = Checkpoint(cfg.model_dir)
    table = model_class(config.model_type).checkpoint_names
    model_id = fingerprint(checkpoint)
    manifest_path = cfg.out_dir / "manifest.json"
    done = _existing_shards(cfg, model_id)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "experts").mkdir(exist_ok=True)
    experts = ExpertReader(checkpoint, table)
    counts = {layer: _num_experts(config) for layer in experts.layers}
    keys = [(layer, e) for layer in experts.layers for e in range(counts[layer])]
    with contextlib.nullcontext() if manifest_path.exists() else _open_journal(cfg.out_dir, model_id) as journal:
        entries = _write_experts(cfg, experts, _progress(keys, progress, "experts"), done, journal, progress)
    dense = _write_dense(cfg, checkpoint, table)
    affinity = _write_affinity(cfg, checkpoint, table, experts, counts, getattr(config, "hidden_act", "silu"))
    manifest = {
        "format": FORMAT,
        "model": model_id,
        "model_type": config.model_type,
        "source": str(cfg.model_dir.resolve()),
        "dtype_arg": cfg.dtype,
        "quantize": cfg.quantize,
        "group_size": cfg.group_size,
        "experts": {str(layer): n for layer, n in counts.items()},
        "dense": dense,
        "affinity": affinity,
        "tensors": entries,
    }
    _write_if_changed(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())  # whole, and last
    (cfg.out_dir / UNFINISHED).unlink(missing_ok=True)
    return manifest


def _write_experts(cfg: PrepareConfig, experts: ExpertReader, keys, done: dict, journal, progress: bool) -> list[dict]:
    """Keep each expert's shard that is already there and intact; write the others (and journal them)."""
    entries, rewritten = [], []
    for layer, expert in keys:
        old = done.get((layer, expert))
        if old is not None and _intact(cfg.out_dir, old):
            entries += old
            continue
        new = _write_expert(cfg, experts, layer, expert)
        entries += new
        if old is not None:
            rewritten.append(new[0]["file"])
        if journal is not None:
            journal.write(json.dumps({"key": [layer, expert], "options": _options(cfg), "entries": new}) + "\n")
            journal.flush()
    if rewritten and progress:
        print(f"[specmoe] rewrote {len(rewritten)} shard(s) that did not match the manifest: {', '.join(rewritten)}",
              file=sys.stderr)
    return entries


def _options(cfg: PrepareConfig) -> list:
    return [cfg.dtype, cfg.quantize, cfg.group_size]


def _existing_shards(cfg: PrepareConfig, model_id: str) -> dict[tuple[int, int], list[dict]]:
    """Manifest entries of the shards a finished or interrupted run of this model wrote here."""
    manifest_path = cfg.out_dir / "manifest.json"
    if manifest_path.exists():
        old = _read_json(manifest_path)
        if old.get("model") != model_id:
            raise ValueError(
                f"{cfg.out_dir} holds shards of another model (fingerprint {old.get('model')}, this one is {model_id}); "
                "choose an empty directory"
            )
        if [old.get("dtype_arg"), old.get("quantize"), old.get("group_size")] != _options(cfg):
            raise ValueError(
                f"{cfg.out_dir} was prepared with other options (dtype {old.get('dtype_arg')}, quantize "
                f"{old.get('quantize')}, group size {old.get('group_size')}); use them, or choose an empty directory"
            )
        out: dict[tuple[int, int], list[dict]] = {}
        for entry in old["tensors"]:
            out.setdefault((entry["layer"], entry["expert"]), []).append(entry)
        return out
    if not cfg.out_dir.exists() or not any(cfg.out_dir.iterdir()):
        return {}
    if _unfinished(cfg.out_dir) != model_id:
        raise ValueError(f"{cfg.out_dir} is not empty and holds no manifest of this model; choose an empty directory")
    out = {}
    for line in (cfg.out_dir / UNFINISHED).read_text().splitlines()[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the run was stopped
            continue
        if record["options"] == _options(cfg):
            out[tuple(record["key"])] = record["entries"]
    return out


def _open_journal(out_dir: Path, model_id: str):
    marker = out_dir / UNFINISHED
    if _unfinished(out_dir) != model_id:
        marker.write_text(model_id + "\n")
    return open(marker, "a")


def _intact(root: Path, entries: list[dict]) -> bool:
    try:
        read_shard(root, {e["name"]: e for e in entries}, [e["name"] for e in entries])
        return True
    except CorruptShardError:
        return False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete the directory and run `specmoe prepare` again") from None


def _unfinished(out_dir: Path) -> str | None:
    """The fingerprint of the model an interrupted ``prepare`` was writing here, if any."""
    marker = out_dir / UNFINISHED
    return marker.read_text().partition("\n")[0].strip() if marker.exists() else None


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
    tmp = cfg.out_dir / (file + ".tmp")
    save_file(out, tmp)
    tmp.replace(cfg.out_dir / file)
    return [_entry(layer, expert, name, file, t) for name, t in out.items()]


def _entry(layer: int, expert: int, name: str, file: str, t: torch.Tensor) -> dict:
    dtype = TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
    return {"layer": layer, "expert": expert, "name": name, "file": file, "dtype": dtype,
            "shape": list(t.shape), "nbytes": t.nbytes, "crc32": crc32(t)}


def _write_dense(cfg: PrepareConfig, checkpoint: Checkpoint, table) -> dict:
    dense_dir = cfg.out_dir / "dense"
    dense_dir.mkdir(exist_ok=True)
    files = {}
    for name in SIDE_FILES:
        if (cfg.model_dir / name).exists():
            data = (cfg.model_dir / name).read_bytes()
            _write_if_changed(dense_dir / name, data)
            files[name] = zlib.crc32(data)
    tensors = {}
    for name in checkpoint.names():
        param = (match_name(name, table) or (name, None, "whole"))[0]
        if EXPERT_PARAM.match(param):
            continue
        t = checkpoint.read([name])[name]
        tensors[param] = (t.to(DTYPES[cfg.dtype]) if cfg.dtype is not None else t).contiguous()
    data = save(tensors)
    _write_if_changed(dense_dir / "model.safetensors", data)
    files["model.safetensors"] = zlib.crc32(data)
    return {"dir": "dense", "tensors": len(tensors), "nbytes": sum(t.nbytes for t in tensors.values()), "crc32": files}


def _write_affinity(cfg: PrepareConfig, checkpoint: Checkpoint, table, experts: ExpertReader, counts: dict[int, int],
                    act: str) -> dict:
    """The affinity table beside the manifest; one already there with this distance and intact is kept
    (computing it reads every expert again)."""
    path = cfg.out_dir / AFFINITY_FILE
    old = _read_json(cfg.out_dir / "manifest.json").get("affinity") if (cfg.out_dir / "manifest.json").exists() else None
    if old and old["distance"] == cfg.affinity_distance and path.exists() and _file_crc32(path) == old["crc32"]:
        return old
    wanted = {name for layer in counts for name in (router_name(layer), gain_name(layer))}
    names = {param: name for name in checkpoint.names() if (param := (match_name(name, table) or (name, None, "whole"))[0]) in wanted}
    got = checkpoint.read(list(names.values()))
    params = {param: got[name] for param, name in names.items()}

    def read(layer: int, expert: int):
        gate_up, down = experts.read(layer, expert)
        return (gate_up.to(DTYPES[cfg.dtype]), down.to(DTYPES[cfg.dtype])) if cfg.dtype is not None else (gate_up, down)

    data = (json.dumps(build_table(read, counts, params, act, cfg.affinity_distance).to_json(), indent=1) + "\n").encode()
    _write_if_changed(path, data)
    return {"file": AFFINITY_FILE, "distance": cfg.affinity_distance, "nbytes": len(data), "crc32": zlib.crc32(data)}


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file and a rename, unless it is there already."""
    if path.exists() and path.stat().st_size == len(data) and _same_bytes(path, memoryview(data)):
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _same_bytes(path: Path, data: memoryview) -> bool:
    with open(path, "rb") as f:
        for start in range(0, len(data), 16 << 20):
            if f.read(16 << 20) != data[start : start + (16 << 20)]:
                return False
    return True


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def read_shard(root: Path, entries: dict[str, dict], names, verify: bool = True, hint: str = "") -> dict[str, torch.Tensor]:
    """The named tensors of one expert's shard file, checked against their manifest ``entries``."""
    file = root / next(iter(entries.values()))["file"]
    out = {}
    try:
        with safe_open(file, framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)
    except Exception as err:  # a missing, truncated or unreadable file
        raise CorruptShardError(f"cannot read {file}: {err}{hint}") from err
    for name, t in out.items():
        entry = entries[name]
        if list(t.shape) != entry["shape"] or (verify and crc32(t) != entry["crc32"]):
            raise CorruptShardError(
                f"tensor {name!r} of layer {entry['layer']} expert {entry['expert']} in {file} does not match the manifest{hint}"
            )
    return out


def prepare_command(manifest: dict, root: Path) -> str:
    """The ``specmoe prepare`` command that wrote ``root`` (and rewrites what is wrong in it)."""
    words = ["specmoe", "prepare", manifest.get("source") or "MODEL_DIR", str(root)]
    if manifest.get("dtype_arg"):
        words += ["--dtype", manifest["dtype_arg"]]
    if manifest.get("quantize"):
        words += ["--quantize", manifest["quantize"]]
    if manifest.get("group_size", 32) != 32:
        words += ["--group-size", str(manifest["group_size"])]
    return shlex.join(words)


def verify_prepared(root: str | Path) -> list[str]:
    """The files of a prepared directory (relative paths) whose bytes do not match its manifest.

    Reads every byte once: the CRC-32 of every expert tensor and of the dense part's files.
    """
    reader = ShardReader(root)
    bad = []
    for key in reader.keys():
        entries = reader.entries(*key)
        if not _intact(reader.root, entries):
            bad.append(entries[0]["file"])
    for name, crc in reader.manifest["dense"].get("crc32", {}).items():
        path = reader.root / "dense" / name
        if not path.exists() or _file_crc32(path) != crc:
            bad.append(f"dense/{name}")
    affinity = reader.manifest.get("affinity")
    if affinity and (not (reader.root / affinity["file"]).exists() or _file_crc32(reader.root / affinity["file"]) != affinity["crc32"]):
        bad.append(affinity["file"])
    return bad


class ShardReader:
    """Reads experts from a prepared directory, checking each tensor against the manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise ValueError(f"{self.root} is not a prepared directory (no manifest.json); run `specmoe prepare` first")
        self.manifest = _read_json(manifest)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest} has format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.index: dict[tuple[int, int], dict[str, dict]] = {}
        for entry in self.manifest["tensors"]:
            if not (self.root / entry["file"]).resolve().is_relative_to(self.root.resolve()):
                raise ValueError(f"{manifest} names a file outside its directory: {entry['file']!r}")
            self.index.setdefault((entry["layer"], entry["expert"]), {})[entry["name"]] = entry
        self.repair_hint = f"; to rewrite it, run: {prepare_command(self.manifest, self.root)}"

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
        return read_shard(self.root, self._entries(layer, expert), names, verify, self.repair_hint)

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
    parser.add_argument("--affinity-distance", choices=DISTANCES, default=DEFAULT_DISTANCE,
                        help="how the hot draft policy's affinity table orders experts (default: %(default)s, measured "
                             "best by draft acceptance; see specmoe.affinity)")


def run_prepare(args: argparse.Namespace) -> int:
    cfg = PrepareConfig(args.model_dir, args.out_dir, args.dtype, args.quantize, args.group_size, args.affinity_distance)
    manifest = prepare(cfg)
    total = sum(e["nbytes"] for e in manifest["tensors"])
    print(f"[specmoe] {len(manifest['tensors'])} expert tensors ({total / 2**20:.1f} MiB) and the dense part "
          f"({manifest['dense']['nbytes'] / 2**20:.1f} MiB) in {cfg.out_dir}", file=sys.stderr)
    return 0
