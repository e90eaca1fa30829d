"""Train the project's small shipped MoE on Tiny Shakespeare.

    python -m specmoe.tools.train_tiny --corpus ../shared/data/tinyshakespeare.txt \\
        --out models/shakespeare-tiny-moe

A byte-level BPE tokenizer (``tokenizers``) and a Mixtral-family MoE (transformers'
``MixtralForCausalLM``, so the result loads in transformers as well as in our engine),
trained on the first 95% of the corpus and evaluated on the last 5%. Deterministic under
``--seed`` on a given machine. Writes a Hugging Face directory (bf16 weights) with a model
card stating the command, the losses and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    corpus: str
    out: str
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    aux_loss: float = 0.01
    eval_windows: int = 200
    max_minutes: float = 14.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps, batch_size must be >= 1 and seq_len >= 2")


def log(message: str) -> None:
    print(f"[train_tiny] {message}", file=sys.stderr, flush=True)


def split_corpus(text: str) -> tuple[str, str]:
    cut = int(0.95 * len(text))
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE with ``<|endoftext|>`` as id 0, wrapped for transformers."""
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
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


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
        output_router_logits=True,
    )


def batches(tokens: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Endless random windows [B, T+1] of the training token stream."""
    while True:
        starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        yield torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts.tolist()])


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokens: torch.Tensor, cfg: TrainConfig) -> tuple[float, int, float]:
    """Returns (final smoothed train loss, steps done, seconds)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    model.train()
    started, smoothed, step = time.perf_counter(), None, 0
    for step, batch in zip(range(cfg.steps), batches(tokens, cfg, gen)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        loss = out.loss  # includes the router's load-balancing loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        elapsed = time.perf_counter() - started
        if step % 25 == 0:
            log(f"step {step:4d}/{cfg.steps} loss {smoothed:.3f} ({elapsed:.0f}s)")
        if elapsed > 60 * cfg.max_minutes:
            log(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
    return smoothed, step + 1, time.perf_counter() - started


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean next-token cross-entropy (fp32) over non-overlapping windows of ``tokens``."""
    model.eval()
    n = min(cfg.eval_windows, (len(tokens) - 1) // cfg.seq_len)
    losses = []
    for i in range(0, n, 16):
        starts = range(i * cfg.seq_len, min(n, i + 16) * cfg.seq_len, cfg.seq_len)
        batch = torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum"))
    return (torch.stack(losses).sum() / (n * cfg.seq_len)).item()


def model_card(cfg: TrainConfig, config, params: int, expert_params: int, losses: dict, command: str) -> str:
    rows = [
        ("family", "`mixtral` (`MixtralForCausalLM`), Hub-style per-expert tensor names"),
        ("layers / experts / top-k", f"{cfg.num_layers} / {cfg.num_experts} / {cfg.top_k}"),
        ("hidden / expert intermediate / heads / kv heads", f"{cfg.hidden_size} / {cfg.intermediate_size} / {cfg.num_heads} / {cfg.num_kv_heads}"),
        ("vocabulary", f"{config.vocab_size} (byte-level BPE; `{EOS}` = id 0 is bos, eos and pad)"),
        ("parameters", f"{params / 1e6:.2f} M, of which routed experts {expert_params / 1e6:.2f} M ({expert_params / params:.0%})"),
        ("weights on disk", "bf16"),
        ("training", f"{losses['steps']} AdamW steps of {cfg.batch_size} x {cfg.seq_len} tokens, seed {cfg.seed}, {losses['minutes']:.1f} min on 2 CPU cores"),
        ("loss", f"train {losses['train']:.3f} (smoothed, with router aux loss), validation {losses['validation']:.3f} (last 5% of the corpus, fp32)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# shakespeare-tiny-moe

A small Mixture-of-Experts language model trained on Tiny Shakespeare (first 95% of
`../shared/data/tinyshakespeare.txt`). SpecMoE ships it so that the demo and the tests run
on a model whose routing was learned, not random. It loads in transformers
(`AutoModelForCausalLM.from_pretrained`) and in SpecMoE.

| property | value |
| --- | --- |
{table}

Produced by:

```bash
{command}
```
"""


def run(cfg: TrainConfig, command: str = "") -> dict:
    from transformers import MixtralForCausalLM

    torch.set_num_threads(2)
    text = Path(cfg.corpus).read_text(encoding="utf-8")
    train_text, val_text = split_corpus(text)
    started = time.perf_counter()
    tokenizer = train_tokenizer(train_text, cfg.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    log(f"tokenizer: {len(tokenizer)} tokens; train {len(train_ids)} / validation {len(val_ids)} tokens")
    torch.manual_seed(cfg.seed)
    config = model_config(cfg, len(tokenizer))
    model = MixtralForCausalLM(config)
    train_loss, steps, _ = train(model, train_ids, cfg)
    val_loss = evaluate(model, val_ids, cfg)
    minutes = (time.perf_counter() - started) / 60
    log(f"validation loss {val_loss:.3f}; {minutes:.1f} min")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    losses = {"train": train_loss, "validation": val_loss, "steps": steps, "minutes": minutes}
    command = command or f"python -m specmoe.tools.train_tiny --corpus {cfg.corpus} --out {cfg.out} --seed {cfg.seed} --steps {cfg.steps}"
    (out / "README.md").write_text(model_card(cfg, config, params, expert_params, losses, command))
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), **losses}, indent=1) + "\n")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="training text (Tiny Shakespeare)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes, help="safety stop")
    args = parser.parse_args(argv)
    cfg = TrainConfig(corpus=args.corpus, out=args.out, seed=args.seed, steps=args.steps, max_minutes=args.max_minutes)
    command = "python -m specmoe.tools.train_tiny " + " ".join(argv if argv is not None else sys.argv[1:])
    run(cfg, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
