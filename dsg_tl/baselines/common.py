"""Shared pieces of the fine-tuning baselines (RMU, GradDiff, NPO): the result value, config validation, token
chunks and batches, sequence log-likelihoods, the training loop, and the wall-time / peak-memory meter.

Every baseline edits a deep copy of the caller's model; the caller's model is only read (as the frozen reference).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from dsg_tl.batching import pad_batch
from dsg_tl.config import POSITIVE, ConfigError, field
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.data.corpora import chunk_token_ids


def check_fields(cfg: Any) -> None:
    """Apply the ``metadata["check"]`` range checks of a config dataclass's fields (also on direct construction,
    not only when loaded from YAML); raise ConfigError naming the key."""
    for f in dataclasses.fields(cfg):
        check = f.metadata.get("check")
        value = getattr(cfg, f.name)
        if check is not None and value is not None:
            pred, msg = check
            if not pred(value):
                raise ConfigError(f"{f.name}: {value!r} {msg}")


@config_dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the fine-tuning baselines (AdamW, no weight decay, gradient-norm clip)."""

    lr: float = field(default=1e-5, metadata=POSITIVE)
    steps: int = field(default=400, metadata=POSITIVE)
    batch_size: int = field(default=8, metadata=POSITIVE)
    chunk_len: int = field(default=64, metadata={"check": (lambda v: v >= 4, "must be >= 4")})
    max_chunks: int | None = field(default=None, metadata=POSITIVE)  # per corpus; None: all
    grad_clip: float | None = field(default=1.0, metadata=POSITIVE)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class UnlearnResult:
    """What a fine-tuning baseline returns: the edited copy of the model and the cost of the unlearning phase.

    ``wall_s`` and ``peak_mem_mb`` cover the whole phase (copy, reference pass, training); ``losses`` is the total
    loss per step and ``terms`` each loss term per step.
    """

    model: Any  # HookedTransformer / HookedSAETransformer (a new object; the input model is unchanged)
    wall_s: float
    peak_mem_mb: float
    losses: list[float]
    config: Any
    terms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model, cost: dict, losses: list[float], terms: dict[str, list[float]], config: Any) -> UnlearnResult:
        """The result of a training phase: the trained copy (in eval mode) and the ``measure`` record ``cost``."""
        return cls(model=model.eval(), wall_s=cost["wall_s"], peak_mem_mb=cost["peak_mem_mb"], losses=losses,
                   config=config, terms=terms, memory=cost)

    def summary(self) -> dict:
        return {"wall_s": self.wall_s, "peak_mem_mb": self.peak_mem_mb, "steps": len(self.losses),
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "terms_last": {k: v[-1] for k, v in self.terms.items() if v}, "memory": self.memory}


# ----------------------------------------------------------------------------------------------- cost meter


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the high-water mark
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def measure(device: str | torch.device = "cpu", interval_s: float = 0.005) -> Iterator[dict]:
    """Wall time and peak memory of the enclosed block, filled into the yielded dict on exit.

    CPU: ``peak_mem_mb`` = (highest resident set size seen by a sampling thread every ``interval_s``) - (RSS at
    entry), i.e. the extra memory the block needed at its peak; torch's CPU allocations are invisible to tracemalloc,
    so RSS is what is measured. CUDA: ``torch.cuda.max_memory_allocated`` - allocated at entry.
    """
    out: dict[str, Any] = {}
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    stop = threading.Event()
    start_rss = _rss_bytes()
    peak = [start_rss]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(interval_s)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_cuda = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
        out["wall_s"] = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["rss_start_mb"] = start_rss / 2**20
        out["rss_peak_mb"] = peak[0] / 2**20
        if cuda:
            out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - start_cuda) / 2**20
            out["meter"] = "cuda_max_memory_allocated"
        else:
            out["peak_mem_mb"] = (peak[0] - start_rss) / 2**20
            out["meter"] = "rss_peak_delta"


# ------------------------------------------------------------------------------------------------ data


def token_chunks(tokenizer, texts: Sequence[str], chunk_len: int, max_chunks: int | None = None) -> list[list[int]]:
    """Texts -> fixed-length chunks ``[BOS, ...]`` exactly like the DSG statistics (``chunk_token_ids``)."""
    if not texts:
        raise ValueError("token_chunks: no texts given")
    docs = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    chunks = list(chunk_token_ids(docs, chunk_len, tokenizer.bos_token_id, tokenizer.eos_token_id, max_chunks))
    if not chunks:
        raise ValueError(f"token_chunks: {len(texts)} texts give no full chunk of {chunk_len} tokens; "
                         f"lower chunk_len or give more text")
    return chunks


def batch_stream(chunks: Sequence[Sequence[int]], batch_size: int, generator: torch.Generator
                 ) -> Iterator[Int[Tensor, "batch pos"]]:
    """Endless stream of batches: each epoch visits every chunk once in a fresh random order (seeded)."""
    n = len(chunks)
    data = torch.tensor([list(c) for c in chunks], dtype=torch.long)
    while True:
        order = torch.randperm(n, generator=generator)
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            if len(idx) < min(batch_size, n):  # keep batch shapes constant: wrap into the next epoch
                continue
            yield data[idx]


def content_mask(tokens: Int[Tensor, "batch pos"], tokenizer) -> Bool[Tensor, "batch pos"]:
    """Positions that count (not BOS, EOS or padding), the same definition the statistics and the gate use."""
    special = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    return pad_batch([t.tolist() for t in tokens], tokenizer.pad_token_id, special_ids=special).content_mask


def token_logprobs(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
    """log p_theta(x_t | x_<t) for t = 1..T-1 (the BOS is context only)."""
    logits = model(tokens, return_type="logits")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def target_mask(tokens: Int[Tensor, "batch pos"], tokenizer) -> Bool[Tensor, "batch pos_minus_1"]:
    """Which next-token targets count: every real (non-padding) token after the first."""
    pad = tokenizer.pad_token_id
    return tokens[:, 1:] != pad if pad is not None else torch.ones_like(tokens[:, 1:], dtype=torch.bool)


def sequence_logprob(logp: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """log p(y|x) of each sequence = sum over its target tokens of log p(token | prefix)."""
    return (logp * mask).sum(-1)


def mean_nll(logp: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Mean negative log-likelihood per target token: -sum(mask * logp) / sum(mask)."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ training


class _HookInForward:
    """``mlp.forward`` of a HookedSAETransformer MLP: the class forward applied after ``mlp.hook_in``.

    An object (not a closure), so a deep copy of the model copies it along with the module it points to.
    """

    def __init__(self, mlp) -> None:
        self.mlp = mlp

    def __call__(self, x):
        return type(self.mlp).forward(self.mlp, self.mlp.hook_in(x))


def copy_model(model):
    """An independent deep copy of a HookedTransformer / HookedSAETransformer.

    ``copy.deepcopy`` alone is not enough for sae-lens's HookedSAETransformer: its constructor replaces each
    ``mlp.forward`` by a closure over the ORIGINAL module (to add ``mlp.hook_in``), and deepcopy copies functions by
    reference, so a plain copy's MLPs would run (and send gradients to) the original model's MLP weights. Every
    instance-level ``forward`` is re-bound to the copy's own module; an unknown instance-level forward is an error.
    """
    new = copy.deepcopy(model)
    for name, mod in new.named_modules():
        fwd = vars(mod).get("forward")
        if fwd is None or isinstance(fwd, _HookInForward):
            if isinstance(fwd, _HookInForward) and fwd.mlp is not mod:
                mod.forward = _HookInForward(mod)
            continue
        if hasattr(mod, "hook_in") and getattr(fwd, "__qualname__", "").startswith("add_hook_in_to_mlp"):
            mod.forward = _HookInForward(mod)
        else:
            raise TypeError(f"copy_model: module {name!r} has an instance-level forward {fwd!r} that a deep copy "
                            f"would leave bound to the original model")
    return new


def editable_copy(model, trainable: Callable[[str], bool] | None = None):
    """A deep copy of ``model`` (:func:`copy_model`) whose parameters named by ``trainable`` (all when None) require
    gradients; the rest are frozen."""
    new = copy_model(model)
    for name, p in new.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
    if not any(p.requires_grad for p in new.parameters()):
        raise ValueError("no parameter selected for training")
    return new


def optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, params: Sequence[Tensor], grad_clip: float | None,
                   where: str) -> None:
    """Backward, optional grad-norm clip, step; a non-finite loss is an error naming ``where``."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss became {loss.item()}; lower lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def forget_retain_streams(tokenizer, forget_texts: Sequence[str], retain_texts: Sequence[str], cfg: TrainConfig):
    """Seed everything from ``cfg.seed``; endless shuffled batch streams of forget and retain token chunks."""
    gen = seed_all(cfg.seed)
    forget = batch_stream(token_chunks(tokenizer, forget_texts, cfg.chunk_len, cfg.max_chunks), cfg.batch_size, gen)
    retain = batch_stream(token_chunks(tokenizer, retain_texts, cfg.chunk_len, cfg.max_chunks), cfg.batch_size, gen)
    return forget, retain


def train_loop(model, step_loss: Callable[[int], tuple[Tensor, dict[str, float]]], cfg: TrainConfig, desc: str,
               progress: bool = True) -> tuple[list[float], dict[str, list[float]]]:
    """``cfg.steps`` AdamW steps (weight decay 0, grad-norm clip) on ``step_loss(step) -> (loss, terms)``.

    Only parameters with ``requires_grad`` are optimised. Returns the loss per step and each term per step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses: list[float] = []
    terms: dict[str, list[float]] = {}
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for step in bar:
        loss, parts = step_loss(step)
        optimizer_step(loss, opt, params, cfg.grad_clip, f"{desc} step {step}")
        losses.append(float(loss.detach()))
        for k, v in parts.items():
            terms.setdefault(k, []).append(float(v))
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return losses, terms


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


__all__ = ["TrainConfig", "UnlearnResult", "check_fields", "measure", "token_chunks", "batch_stream",
           "content_mask", "token_logprobs", "copy_model", "target_mask", "sequence_logprob", "mean_nll", "editable_copy",
           "train_loop", "seed_all", "model_device", "config_grid"]


def config_grid(base: Any, axes: dict[str, Sequence[Any]]) -> list[Any]:
    """Every combination of ``axes`` values applied to ``base`` (a config dataclass), in row-major order."""
    import itertools

    names = list(axes)
    return [dataclasses.replace(base, **dict(zip(names, values)))
            for values in itertools.product(*(axes[n] for n in names))]
