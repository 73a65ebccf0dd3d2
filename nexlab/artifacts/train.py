"""Training the tiny Nex-N2-mini with transformers' ``Qwen3_5MoeForCausalLM`` on CPU.

Plain next-token training on the ``train`` split: the split is tokenized once, cut into
random windows of ``seq_len`` tokens (a seeded ``torch.Generator`` picks the offsets),
AdamW with linear warm-up then cosine decay, float32 master weights (CPU bfloat16 matmuls
are slower than float32 on most CPUs and would add rounding noise to a short run). The
router's load-balancing loss (transformers' ``router_aux_loss_coef``) is on during training.

Held-out loss is the mean token cross-entropy over non-overlapping ``seq_len`` windows of
the ``heldout`` split, computed on the model as saved (weights rounded to bfloat16).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nexlab.core.errors import NexlabError
from nexlab.core.progress import progress
from nexlab.model.tokenizer import encode_text


@dataclass
class TrainSettings:
    """Knobs of :func:`train_tiny` (defaults: the full run, a few minutes on 2 cores)."""

    steps: int = 100
    seq_len: int = 256  # a multiple of 64, the gated delta rule's chunk
    batch_size: int = 4
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1  # 2 threads on the shared 2-core machine ran 3-5x slower (OpenMP oversubscription)
    time_budget_s: float | None = 240.0  # stop early (and record it) past this
    eval_windows: int = 64  # held-out windows of seq_len tokens

    @classmethod
    def smoke(cls, seed: int = 0) -> "TrainSettings":
        return cls(steps=4, seq_len=64, batch_size=4, warmup=1, seed=seed, time_budget_s=60.0, eval_windows=8)


@dataclass
class TrainResult:
    settings: dict
    losses: list = field(default_factory=list)  # [step, train loss]
    steps_done: int = 0
    seconds: float = 0.0
    tokens_seen: int = 0
    heldout_loss: float = float("nan")
    heldout_perplexity: float = float("nan")
    heldout_tokens: int = 0
    stopped_by_time_budget: bool = False


def tokenize_file(tokenizer, path) -> torch.Tensor:
    """Token ids of a text file as a 1-D int64 tensor (:func:`nexlab.model.tokenizer.encode_text`)."""
    return torch.from_numpy(encode_text(Path(path), tokenizer).astype(np.int64))


def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over non-overlapping windows; returns (loss, tokens scored)."""
    if tokens.ndim != 1 or tokens.numel() < seq_len + 1:
        raise NexlabError(f"held-out tokens must be 1-D with more than seq_len={seq_len} tokens")
    n = (tokens.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    model.eval()
    total, count = 0.0, 0
    windows = tokens[: n * seq_len + 1]
    for b in range(0, n, 8):
        idx = torch.arange(b, min(n, b + 8))
        x = torch.stack([windows[i * seq_len:(i + 1) * seq_len] for i in idx.tolist()])
        y = torch.stack([windows[i * seq_len + 1:(i + 1) * seq_len + 1] for i in idx.tolist()])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()
    return total / count, count


def train_tiny(model, train_tokens: torch.Tensor, heldout_tokens: torch.Tensor, settings: TrainSettings) -> TrainResult:
    """Train ``model`` (a ``Qwen3_5MoeForCausalLM``) in place; returns losses and held-out figures.

    The held-out figures are measured after rounding the weights to bfloat16 (the checkpoint
    dtype); the model is returned in bfloat16.
    """
    s = settings
    if train_tokens.ndim != 1 or train_tokens.numel() < s.seq_len + 2:
        raise NexlabError(f"train tokens must be 1-D with more than seq_len={s.seq_len} tokens")
    torch.set_num_threads(s.threads)
    gen = torch.Generator().manual_seed(s.seed)
    model.float().train()
    model.config.output_router_logits = True
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    res = TrainResult(settings=asdict(s))
    t0 = time.perf_counter()
    hi = train_tokens.numel() - s.seq_len - 1
    for step in progress(range(s.steps), total=s.steps, desc="train tiny"):
        offs = torch.randint(0, hi, (s.batch_size,), generator=gen)
        # Windows of exactly seq_len tokens (a multiple of the 64-token chunk of the gated delta rule:
        # an odd length such as seq_len + 1 makes transformers' CPU path several times slower).
        idx = offs[:, None] + torch.arange(s.seq_len)[None, :]
        batch = train_tokens[idx]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        out = model(input_ids=batch, labels=batch)  # transformers shifts labels internally
        loss = out.loss
        if not torch.isfinite(loss):
            raise NexlabError(f"training loss became {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        aux = float(out.aux_loss.detach()) * model.config.router_aux_loss_coef if out.aux_loss is not None else 0.0
        lm_loss = float(loss.detach()) - aux  # record the language-model loss without the balancing term
        res.losses.append([step, lm_loss])
        res.steps_done = step + 1
        res.tokens_seen += s.batch_size * (s.seq_len - 1)
        if s.time_budget_s is not None and time.perf_counter() - t0 > s.time_budget_s:
            res.stopped_by_time_budget = step + 1 < s.steps
            break
    res.seconds = time.perf_counter() - t0
    model.config.output_router_logits = False
    model.to(torch.bfloat16).eval()
    loss, n = heldout_loss(model, heldout_tokens, s.seq_len, s.eval_windows)
    res.heldout_loss, res.heldout_tokens = loss, n
    res.heldout_perplexity = math.exp(loss)
    return res
