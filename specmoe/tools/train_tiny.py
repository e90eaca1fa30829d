"""Train the project's small shipped Mixture-of-Experts model on Tiny Shakespeare.

Run from the repository root:

    python -m specmoe.tools.train_tiny --corpus ../shared/data/tinyshakespeare.txt \\
        --out models/shakespeare-tiny-moe

Steps: a byte-level BPE tokenizer (``tokenizers``, ``<|endoftext|>`` = id 0 as bos, eos
and pad) is trained on the first 95% of the corpus; a Mixtral-family MoE (transformers'
``MixtralForCausalLM``, so the result loads in transformers as well as in SpecMoE) is
trained on random windows of that token stream with the router's load-balancing loss;
the validation loss is measured on the last 5%. The output is a Hugging Face directory
(bf16 ``model.safetensors`` with Hub-style per-expert tensor names, tokenizer files and
a model card), which is reloaded and sampled from as a final check.

Deterministic under ``--seed`` on a given machine. Progress goes to stderr; the sample
generated from the saved directory goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"
TRAIN_FRACTION = 0.95
SAMPLE_PROMPT = "ROMEO:"
MIN_VOCAB = 257  # the byte-level alphabet plus EOS


@dataclass
class TrainConfig:
    """Everything that determines a training run (the defaults make the shipped model)."""

    corpus: str
    out: str
    seed: int = 0
    # tokenizer and model
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256  # per expert
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512
    # optimisation
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss: float = 0.01  # router load-balancing loss coefficient
    # evaluation and limits
    eval_windows: int = 200
    max_minutes: float = 14.0
    threads: int = 2  # torch CPU threads

    def __post_init__(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_layers", "num_experts", "num_heads",
                    "num_kv_heads", "max_positions", "steps", "batch_size", "eval_windows", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 byte tokens and {EOS}), got {self.vocab_size}")
        if self.seq_len > self.max_positions:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_positions {self.max_positions}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into num_heads {self.num_heads} heads of even size (rotary)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.aux_loss < 0 or self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError(
                f"aux_loss must be >= 0 and lr, max_minutes > 0; got {self.aux_loss}, {self.lr}, {self.max_minutes}"
            )


@dataclass
class TrainResult:
    """What the training loop reports."""

    loss: float  # mean cross-entropy over the last steps (router aux loss excluded)
    aux_loss: float  # mean router load-balancing loss over the same steps (top_k when balanced)
    steps: int
    seconds: float


def log(message: str) -> None:
    print(f"[train_tiny] {message}", file=sys.stderr, flush=True)


def split_corpus(text: str, fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """(first ``fraction`` of the characters, the rest)."""
    cut = int(fraction * len(text))
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE with ``<|endoftext|>`` as id 0, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    if tok.token_to_id(EOS) != 0:
        raise RuntimeError(f"{EOS} should be id 0, got {tok.token_to_id(EOS)}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def check_round_trip(tokenizer, text: str) -> None:
    """Byte-level BPE must give the text back exactly."""
    if tokenizer.decode(encode(tokenizer, text).tolist()) != text:
        raise RuntimeError("the tokenizer does not round-trip the text exactly")


def model_config(cfg: TrainConfig, vocab_size: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        router_aux_loss_coef=cfg.aux_loss,
        output_router_logits=True,  # training adds the load-balancing loss; off in the saved config
    )


def build_model(cfg: TrainConfig, vocab_size: int):
    from transformers import MixtralForCausalLM

    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(model_config(cfg, vocab_size))


def batches(tokens: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random windows ``[batch_size, seq_len + 1]`` of the training token stream."""
    if len(tokens) < cfg.seq_len + 2:
        raise ValueError(f"{len(tokens)} training tokens are too few for windows of {cfg.seq_len}")
    while True:
        starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        yield torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts.tolist()])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train(model: torch.nn.Module, tokens: torch.Tensor, cfg: TrainConfig) -> TrainResult:
    """Train in place on random windows of ``tokens`` drawn from a generator seeded by ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    model.train()
    started = time.perf_counter()
    recent: list[tuple[float, float]] = []  # (cross-entropy, aux loss) of the last steps
    done = 0
    for step, batch in zip(range(cfg.steps), batches(tokens, cfg, gen)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])  # labels are shifted inside
        opt.zero_grad(set_to_none=True)
        out.loss.backward()  # cross-entropy + aux_loss * load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        aux = out.aux_loss.item()
        recent = (recent + [(out.loss.item() - cfg.aux_loss * aux, aux)])[-50:]
        done = step + 1
        elapsed = time.perf_counter() - started
        if step % 25 == 0 or done == cfg.steps:
            ce = sum(r[0] for r in recent) / len(recent)
            rate = elapsed / done
            log(f"step {done:5d}/{cfg.steps} loss {ce:.3f} lr {lr_at(step, cfg):.2e} {rate:.3f} s/step ({elapsed:.0f}s)")
        if elapsed > 60 * cfg.max_minutes:
            log(f"stopping after step {done}: --max-minutes {cfg.max_minutes} reached")
            break
    return TrainResult(
        loss=sum(r[0] for r in recent) / len(recent),
        aux_loss=sum(r[1] for r in recent) / len(recent),
        steps=done,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean next-token cross-entropy (fp32) over up to ``eval_windows`` non-overlapping windows."""
    model.eval()
    n = min(cfg.eval_windows, (len(tokens) - 1) // cfg.seq_len)
    if n < 1:
        raise ValueError(f"{len(tokens)} validation tokens are too few for one window of {cfg.seq_len}")
    total = torch.zeros((), dtype=torch.float64)
    for first in range(0, n, cfg.batch_size):
        starts = range(first * cfg.seq_len, min(n, first + cfg.batch_size) * cfg.seq_len, cfg.seq_len)
        batch = torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts])
        logits = model(input_ids=batch[:, :-1], output_router_logits=False).logits.float()
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum").double()
    return (total / (n * cfg.seq_len)).item()


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters of the routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total, experts


def save(model, tokenizer, out: Path) -> None:
    """bf16 weights, inference config (no router logits), generation config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, 0)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_card(cfg: TrainConfig, vocab: int, params: tuple[int, int], result: TrainResult, val_loss: float,
               minutes: float, command: str) -> str:
    total, experts = params
    rows = [
        ("family", "`mixtral` (`MixtralForCausalLM`), Hub-style per-expert tensor names"),
        ("layers", cfg.num_layers),
        ("experts per layer / top-k", f"{cfg.num_experts} / {cfg.top_k}"),
        ("hidden size", cfg.hidden_size),
        ("intermediate size (per expert)", cfg.intermediate_size),
        ("attention heads / kv heads", f"{cfg.num_heads} / {cfg.num_kv_heads}"),
        ("vocabulary", f"{vocab} (byte-level BPE; `{EOS}` = id 0 is bos, eos and pad)"),
        ("max positions", cfg.max_positions),
        ("parameters", f"{total:,} ({total / 1e6:.2f} M)"),
        ("expert parameters", f"{experts:,} ({experts / total:.1%} of all; {cfg.top_k} of {cfg.num_experts} active per token)"),
        ("weights on disk", "bfloat16 safetensors"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {Path(cfg.out).name}

A small Mixture-of-Experts language model trained on Tiny Shakespeare. SpecMoE ships it
so that the demo and the tests run on a model whose routing was learned, not random. It
loads in transformers (`AutoModelForCausalLM` / `AutoTokenizer`) and in SpecMoE. It is a
toy: it writes Shakespeare-shaped text, not sense.

| property | value |
| --- | --- |
{table}

## Training

- Data: `../shared/data/tinyshakespeare.txt` (relative to the repository root); first 95%
  of the characters for training (tokenizer and model), last 5% for validation.
- {result.steps} AdamW steps of {cfg.batch_size} x {cfg.seq_len} tokens (random windows), lr {cfg.lr:g}
  ({cfg.warmup} warmup steps, cosine decay to {cfg.lr * cfg.min_lr_ratio:g}), weight decay {cfg.weight_decay:g}, gradient clip
  {cfg.grad_clip:g}, router load-balancing loss coefficient {cfg.aux_loss:g}; seed {cfg.seed}.
- Wall time: {minutes:.1f} min on {cfg.threads} CPU thread(s) (tokenizer, training and evaluation).
- Final train loss: {result.loss:.3f} (cross-entropy, mean of the last 50 steps; router
  load-balancing loss {result.aux_loss:.3f} on top, {cfg.top_k:g} when perfectly balanced).
- Validation loss: {val_loss:.3f} (mean cross-entropy per token, fp32, over up to
  {cfg.eval_windows} non-overlapping {cfg.seq_len}-token windows of the last 5%).

Reproduce (same seed, same machine: same weights):

```bash
{command}
```
"""


def verify(out: Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 60) -> str:
    """Reload the directory with transformers (offline, no key mismatches) and sample from it."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True, local_files_only=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"reloading {out} reported {problems}")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    check_round_trip(tokenizer, "ROMEO:\nWhat, ho! -- 'tis I, thy  Juliet's  nurse.\n\n")
    ids = encode(tokenizer, prompt).unsqueeze(0)
    torch.manual_seed(0)
    generated = model.eval().generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40)
    return tokenizer.decode(generated[0], skip_special_tokens=True)


def run(cfg: TrainConfig, command: str = "") -> dict:
    """Train, evaluate and save; returns the numbers written to ``training.json``."""
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    train_text, val_text = split_corpus(Path(cfg.corpus).read_text(encoding="utf-8"))
    tokenizer = train_tokenizer(train_text, cfg.vocab_size)
    check_round_trip(tokenizer, val_text)
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    log(f"tokenizer: {len(tokenizer)} tokens; train {len(train_ids):,} / validation {len(val_ids):,} tokens "
        f"({time.perf_counter() - started:.0f}s)")

    model = build_model(cfg, len(tokenizer))
    result = train(model, train_ids, cfg)
    val_loss = evaluate(model, val_ids, cfg)
    minutes = (time.perf_counter() - started) / 60
    log(f"train loss {result.loss:.3f}, validation loss {val_loss:.3f}; {result.steps} steps, {minutes:.1f} min")

    out = Path(cfg.out)
    params = parameter_counts(model)
    save(model, tokenizer, out)
    command = command or (
        f"python -m specmoe.tools.train_tiny --corpus {cfg.corpus} --out {cfg.out} --seed {cfg.seed} --steps {cfg.steps}"
    )
    card = model_card(cfg, len(tokenizer), params, result, val_loss, minutes, command)
    (out / "README.md").write_text(card, encoding="utf-8")
    summary = {"train_loss": result.loss, "router_aux_loss": result.aux_loss, "validation_loss": val_loss,
               "steps": result.steps, "minutes": minutes, "parameters": params[0], "expert_parameters": params[1]}
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), **summary}, indent=1) + "\n", encoding="utf-8")
    return summary


# TrainConfig fields settable from the command line as --field-name, with their help text.
ARCH_FLAGS = {
    "vocab_size": "tokenizer vocabulary, including <|endoftext|>",
    "hidden_size": "model width",
    "intermediate_size": "hidden width of one expert",
    "num_layers": "decoder layers",
    "num_experts": "routed experts per layer",
    "top_k": "experts per token",
    "num_heads": "attention heads",
    "num_kv_heads": "key/value heads",
    "max_positions": "max_position_embeddings",
    "seq_len": "training window in tokens",
    "batch_size": "windows per step",
    "warmup": "warmup steps",
    "aux_loss": "router load-balancing loss coefficient (lower: more skewed routing)",
}


def parse_args(argv: list[str] | None) -> TrainConfig:
    defaults = TrainConfig(corpus="", out="")
    p = argparse.ArgumentParser(prog="python -m specmoe.tools.train_tiny", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="training text, e.g. ../shared/data/tinyshakespeare.txt")
    p.add_argument("--out", required=True, help="output model directory (created; files are overwritten)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seeds model init and batch sampling (default %(default)s)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--eval-windows", type=int, default=defaults.eval_windows,
                   help="validation windows of seq_len tokens (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=defaults.max_minutes,
                   help="safety stop: end training after this many minutes (default %(default)s)")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (default %(default)s)")
    arch = p.add_argument_group("architecture and batch (the defaults make the shipped model)")
    for field, help_text in ARCH_FLAGS.items():
        default = getattr(defaults, field)
        arch.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                          help=f"{help_text} (default %(default)s)")
    args = p.parse_args(argv)
    try:
        return TrainConfig(corpus=args.corpus, out=args.out, seed=args.seed, steps=args.steps, lr=args.lr,
                           eval_windows=args.eval_windows, max_minutes=args.max_minutes, threads=args.threads,
                           **{field: getattr(args, field) for field in ARCH_FLAGS})
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    command = "python -m specmoe.tools.train_tiny " + " ".join(argv if argv is not None else sys.argv[1:])
    run(cfg, command)
    log(f"reloading {cfg.out} with transformers and sampling from {SAMPLE_PROMPT!r}")
    print(verify(Path(cfg.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
