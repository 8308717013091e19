"""Train one task's sparse JumpLoRA adapter (or a dense LoRA baseline) on top of the frozen stack."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import jumplora as jl
from .model import replace_modules, target_linears
from .schemas import TrainConfig

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]  # prompt + completion + eos
    labels: list[int]  # IGNORE on the prompt, the token ids on completion + eos


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    density: float
    threshold: float | None
    tokens: int  # training tokens seen so far


@dataclass
class TrainResult:
    deltas: dict[str, torch.Tensor]  # layer -> (d_out, d_in) float32: s·J(ΔW) (s·ΔW for lora)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # lora only: layer -> (A, B, scale)
    metrics: dict = field(default_factory=dict)


def encode(tokenizer, prompt: str, completion: str) -> Example:
    """Tokenize a row exactly as serving will see its prompt; the completion is followed by end-of-sequence."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(input_ids=p + c, labels=[IGNORE] * len(p) + c)


def collate(batch: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, labels), each (B, T)."""
    t = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def completion_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over completion tokens. The LM head runs only at the positions that predict one,
    which avoids a (B, T, vocab) logits tensor."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
    target = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    sel = target != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][sel])  # (n, vocab)
    return F.cross_entropy(logits.float(), target[sel])


def total_steps(n_rows: int, cfg: TrainConfig) -> int:
    steps = cfg.epochs * math.ceil(n_rows / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


class AttachedAdapter:
    """One task's trainable layers swapped into a model (context manager: the original Linears come back)."""

    def __init__(self, model, cfg: TrainConfig, past: dict[str, torch.Tensor] | None):
        self.model, self.cfg = model, cfg
        self.originals = target_linears(model, cfg.targets)
        self.gated = cfg.method == "jumplora"
        self.schedule = jl.Schedule()
        blocks = sorted({jl.block_index(n) for n in self.originals}) if cfg.threshold_mode == "per_block" else []
        group_of = {b: i for i, b in enumerate(blocks)}
        self.threshold = jl.Threshold(max(1, len(blocks))).to(next(model.parameters()).device) if self.gated else None
        self.layers: dict[str, jl.JumpLoRALinear] = {}
        for name, lin in self.originals.items():
            weight = lin.weight
            if past and name in past:  # train against the frozen stack: W + Σ earlier s·J(ΔW)
                weight = (weight.float() + past[name].to(weight.device)).to(weight.dtype)
            group = group_of[jl.block_index(name)] if blocks else 0
            self.layers[name] = jl.JumpLoRALinear(weight, lin.bias, cfg.rank, cfg.alpha, self.gated, self.threshold,
                                                  group, self.schedule)

    def __enter__(self) -> "AttachedAdapter":
        replace_modules(self.model, self.layers)
        return self

    def __exit__(self, *exc) -> None:
        replace_modules(self.model, self.originals)

    def parameters(self) -> list[torch.nn.Parameter]:
        params = [p for layer in self.layers.values() for p in (layer.A, layer.B)]
        return params + ([self.threshold.tau] if self.threshold is not None else [])

    @torch.no_grad()
    def gate_density(self) -> float:
        """Fraction of ΔW entries the gate keeps now (1.0 with the gate off or before it blends in)."""
        if not self.gated or self.schedule.mix == 0.0:
            return 1.0
        kept = sum(int((l.delta().abs() > l.theta()).sum()) for l in self.layers.values())
        return kept / sum(l.weight.numel() for l in self.layers.values())

    def theta(self) -> float | None:
        return None if self.threshold is None else float(self.threshold.tau.detach().exp().mean())


def train_adapter(model, tokenizer, rows: Sequence[tuple[str, str]], cfg: TrainConfig, *,
                  past: dict[str, torch.Tensor] | None = None,
                  on_progress: Callable[[Progress], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train a new adapter on (prompt, completion) rows against ``model`` whose targeted weights get the frozen
    stack ``past`` (layer -> Σ earlier s·J(ΔW)) merged in. The model itself is left as it was."""
    if not rows:
        raise ValueError("no training rows")
    device = next(model.parameters()).device
    examples = [encode(tokenizer, p, c) for p, c in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = total_steps(len(examples), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # A's Kaiming init
    use_ella = cfg.regularizer == "ella" and bool(past)
    budget = cfg.gate == "budget"  # hold the gate at N_LoRA entries from 0.2·S on (else the paper's learned θ)
    start, tokens, loss_value = time.monotonic(), 0, float("nan")
    with AttachedAdapter(model, cfg, past) as adapter:
        opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
        reset_at = jl.reset_step(steps)
        thetas: list[float] = []
        step = 0
        while step < steps:
            order = torch.randperm(len(examples), generator=gen).tolist()
            for i in range(0, len(order), cfg.batch_size):
                if step >= steps:
                    break
                if should_stop is not None and should_stop():
                    raise InterruptedError("training was cancelled")
                if adapter.gated and (step == reset_at or (budget and step > reset_at)):
                    thetas = jl.reset_thresholds(list(adapter.layers.values()), adapter.threshold)
                adapter.schedule.mix = jl.sparsity_mix(step, steps)
                batch = [examples[j] for j in order[i:i + cfg.batch_size]]
                ids, mask, labels = collate(batch, pad_id, device)
                loss = completion_loss(model, ids, mask, labels)
                if use_ella:
                    loss = loss + jl.ella_penalty(adapter.layers, past, cfg.ella_lambda)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                tokens += int(mask.sum())
                loss_value = float(loss.detach())
                if on_progress is not None:
                    on_progress(Progress(step, steps, loss_value, adapter.gate_density(), adapter.theta(), tokens))
        if adapter.gated and (reset_at >= steps or budget):  # (re)set before export
            thetas = jl.reset_thresholds(list(adapter.layers.values()), adapter.threshold)
        deltas = {name: layer.export() for name, layer in adapter.layers.items()}
        n_lora = sum(cfg.rank * sum(o.weight.shape) for o in adapter.originals.values())
        if adapter.gated and budget:  # at most N_LoRA entries, even where |ΔW| ties at θ
            jl.trim_to_budget(deltas, n_lora)
        lowrank = {} if adapter.gated else {
            name: (l.A.detach().clone(), l.B.detach().clone(), l.scale) for name, l in adapter.layers.items()}
    nz, total = jl.density(deltas.values())
    metrics = {
        "final_loss": loss_value, "steps": steps, "train_rows": len(examples), "train_tokens": tokens,
        "nonzero": nz, "total_entries": total, "density": nz / total, "seconds": time.monotonic() - start,
        "n_lora": n_lora,
        "thresholds": thetas,
    }
    return TrainResult(deltas=deltas, lowrank=lowrank, metrics=metrics)


def normalize(text: str) -> str:
    """The exact-match form of an answer: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


@torch.no_grad()
def greedy_texts(model, tokenizer, rows: Sequence[tuple[str, str]], batch_size: int = 16) -> list[str]:
    """The greedy completion of each row's prompt, up to 2 tokens longer than the longest reference of its batch.
    The model is used as it is (merge a delta into it first to evaluate an adapter)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts: list[str] = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in chunk)
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=longest + 2, do_sample=False, pad_token_id=pad)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts


def exact_match(model, tokenizer, rows: Sequence[tuple[str, str]], batch_size: int = 16,
                texts: list[str] | None = None) -> float:
    """Share of rows whose greedy completion (``texts``, else generated now) equals the reference after
    ``normalize``."""
    if not rows:
        return float("nan")
    texts = texts if texts is not None else greedy_texts(model, tokenizer, rows, batch_size)
    return sum(normalize(t) == normalize(c) for t, (_, c) in zip(texts, rows)) / len(rows)
