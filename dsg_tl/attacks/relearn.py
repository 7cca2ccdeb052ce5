"""Relearning attack: fine-tune a copy of an unlearned model on forget documents, and measure what comes back.

The attacker knows part of the forget domain. The domain's ENTITIES are split into an attacker-known half and a
held-out half (:func:`split_entities`); the attacker fine-tunes on documents that mention attacker-known entities
only (:func:`attacker_documents`), and accuracy is measured on MCQ items about held-out entities only
(:func:`items_for_entities`). So any recovery on the held-out facts is knowledge the defence suppressed but did not
remove, not knowledge the attacker re-taught.

Training (:func:`relearn`): next-token loss
    L = -(1/|T|) sum_{(i,t) in T} log p_theta(x_{i,t} | x_{i,<t}),  T = every real (non-padding) target token
of ``BOS + document`` sequences, AdamW, ``epochs`` passes over the attacker's documents in a seeded order. Either
every weight is trained (``adapter="full"``) or a low-rank adapter (``adapter="lora"``): each chosen weight tensor W
is reparametrised as W + (alpha / r) * reshape(A @ B) with A [d_in, r] ~ N(0, 1/d_in), B [r, d_out] = 0, and only
A, B train (merged into W at the end). With ``guardrail`` the guardrail is attached during the training forwards
(train-time DSG): its clamp is part of the computation graph, so gradients flow through the clamped hook.

Conditions of the study (:func:`relearn_study`, the paper's Figs. 5 and 10 on the world):
  base           attack the base model, evaluate bare
  dsg_test_time  the SAME attacked weights as ``base``, evaluated with the pre-attack guardrail attached
  dsg_train_time attack with the guardrail attached during fine-tuning, evaluate with it attached
  rmu            attack the RMU-unlearned model, evaluate bare
The guardrail (selection and tau) is always the one fitted before the attack; it is never refitted.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from dsg_tl.baselines.common import check_fields, copy_model, mean_nll, optimizer_step
from dsg_tl.batching import pad_batch
from dsg_tl.config import FRACTION, POSITIVE, field
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.data.types import MCQItem
from dsg_tl.plotting import pyplot, save_figure
from dsg_tl.world.facts import Fact, World

Adapter = Literal["full", "lora"]
EvalOutput = float | Mapping[str, float]

# TransformerLens weight layouts: name -> (module attribute path under a block, how A @ B maps onto the tensor)
LORA_TARGETS: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
_LORA_MODULE = {"W_Q": "attn", "W_K": "attn", "W_V": "attn", "W_O": "attn", "W_in": "mlp", "W_out": "mlp"}


# ------------------------------------------------------------------------------------------- entity split and data


@dataclass(frozen=True)
class EntitySplit:
    """The forget domain's entities, split into those the attacker knows and those held out for evaluation."""

    domain: str
    attacker: tuple[str, ...]
    heldout: tuple[str, ...]

    def __post_init__(self) -> None:
        if set(self.attacker) & set(self.heldout):
            raise ValueError(f"attacker and held-out entities overlap: {sorted(set(self.attacker) & set(self.heldout))}")


def split_entities(world: World, domain: str, attacker_fraction: float = 0.5, seed: int = 0) -> EntitySplit:
    """Seeded random split of ``domain``'s entities: round(fraction * n) attacker-known, the rest held out."""
    ents = world.entities(domain)
    if len(ents) < 2:
        raise ValueError(f"domain {domain!r} has {len(ents)} entities; a split needs at least 2")
    if not 0 < attacker_fraction < 1:
        raise ValueError(f"attacker_fraction must be in (0, 1), got {attacker_fraction}")
    rng = random.Random(seed)
    shuffled = list(ents)
    rng.shuffle(shuffled)
    k = min(len(ents) - 1, max(1, round(attacker_fraction * len(ents))))
    return EntitySplit(domain, tuple(sorted(shuffled[:k])), tuple(sorted(shuffled[k:])))


def _name_pattern(entities: Sequence[str]) -> re.Pattern:
    # longest first, whole words: "Bako" must not match inside "Bakoru"
    names = sorted(entities, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b")


def mentioned_entities(text: str, entities: Sequence[str]) -> set[str]:
    """The entities of ``entities`` whose names occur in ``text`` as whole words."""
    if not entities:
        return set()
    return set(_name_pattern(entities).findall(text))


def attacker_documents(world: World, split: EntitySplit) -> list[str]:
    """Documents of the domain that mention at least one attacker-known entity and no held-out entity."""
    known, held = _name_pattern(split.attacker), _name_pattern(split.heldout)
    return [d for d in world.documents[split.domain] if known.search(d) and not held.search(d)]


def fact_items(world: World, mcq_split: str, domain: str) -> list[tuple[Fact, MCQItem]]:
    """Each MCQ item of ``domain`` with the fact it asks about.

    The world writes one item per fact, in the order of ``world.facts``; the pairing is checked (entity named in the
    question, right choice = the fact's value), so a change of generator order fails loudly instead of mislabelling.
    """
    facts = [f for f in world.facts if f.domain == domain]
    items = world.mcq[mcq_split][domain]
    if len(facts) != len(items):
        raise ValueError(f"{domain}/{mcq_split}: {len(items)} MCQ items for {len(facts)} facts")
    for f, it in zip(facts, items, strict=True):
        if f.entity not in mentioned_entities(it.question, [f.entity]) or it.choices[it.answer] != f.value:
            raise ValueError(f"MCQ item {it.question!r} does not ask about fact {f}")
    return list(zip(facts, items, strict=True))


def items_for_entities(world: World, mcq_split: str, domain: str, entities: Sequence[str]) -> list[MCQItem]:
    """MCQ items of ``domain`` whose fact is about one of ``entities``."""
    keep = set(entities)
    return [it for f, it in fact_items(world, mcq_split, domain) if f.entity in keep]


# ------------------------------------------------------------------------------------------------- LoRA


class LoRADelta(nn.Module):
    """Parametrisation W -> W + scale * layout(A @ B) of a TransformerLens weight tensor.

    Layouts (in = what the weight reads, out = what it writes):
      W_Q/W_K/W_V [heads, d_model, d_head]: A @ B is [d_model, heads*d_head], viewed [d_model, heads, d_head], permuted
      W_O         [heads, d_head, d_model]: A @ B is [heads*d_head, d_model], viewed [heads, d_head, d_model]
      W_in/W_out  [d_in, d_out]:            A @ B as is
    """

    def __init__(self, name: str, shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        if name in ("W_Q", "W_K", "W_V"):
            h, d_in, d_head = shape
            d_out = h * d_head
        elif name == "W_O":
            h, d_head, d_out = shape
            d_in = h * d_head
        elif len(shape) == 2:
            d_in, d_out = shape
        else:
            raise ValueError(f"no LoRA layout for {name} of shape {shape}")
        self.name, self.shape, self.scale = name, tuple(shape), alpha / rank
        a = torch.randn(d_in, rank, generator=generator) / math.sqrt(d_in)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rank, d_out, device=device, dtype=dtype))

    def delta(self) -> Tensor:
        d = self.A @ self.B
        if self.name in ("W_Q", "W_K", "W_V"):
            h, d_model, d_head = self.shape
            return d.view(d_model, h, d_head).permute(1, 0, 2)
        return d.view(self.shape)

    def forward(self, W: Tensor) -> Tensor:
        return W + self.scale * self.delta()


def add_lora(model, targets: Sequence[str], rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Freeze every weight of ``model`` and put a :class:`LoRADelta` on each block's ``targets``; return A, B params."""
    bad = [t for t in targets if t not in _LORA_MODULE]
    if bad or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {tuple(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    for block in model.blocks:
        for name in targets:
            module = getattr(block, _LORA_MODULE[name])
            W = getattr(module, name)
            lora = LoRADelta(name, tuple(W.shape), rank, alpha, gen, W.dtype, W.device)
            parametrize.register_parametrization(module, name, lora)
            params += [lora.A, lora.B]
    return params


def merge_lora(model) -> None:
    """Fold every LoRA delta into its weight and remove the parametrisations (the model is plain again)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ the attack


@config_dataclass(frozen=True)
class RelearnConfig:
    """The attacker's fine-tuning schedule and data budget."""

    epochs: int = field(default=4, metadata=POSITIVE)
    lr: float = field(default=1e-4, metadata=POSITIVE)
    batch_size: int = field(default=16, metadata=POSITIVE)
    doc_fraction: float = field(default=1.0, metadata=FRACTION)  # of the attacker's documents used
    max_docs: int | None = field(default=None, metadata=POSITIVE)  # cap after the fraction; None: no cap
    adapter: Adapter = "full"
    lora_rank: int = field(default=4, metadata=POSITIVE)
    lora_alpha: float = field(default=8.0, metadata=POSITIVE)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_len: int = field(default=128, metadata={"check": (lambda v: v >= 2, "must be >= 2")})
    weight_decay: float = field(default=0.0, metadata={"check": (lambda v: v >= 0, "must be >= 0")})
    grad_clip: float | None = field(default=1.0, metadata=POSITIVE)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.adapter not in ("full", "lora"):
            raise ValueError(f"adapter must be 'full' or 'lora', got {self.adapter!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets:
            raise ValueError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}, got {self.lora_targets}")


@dataclass
class RelearnResult:
    """Per-epoch curves of one attack. ``curves[name][e]`` is eval_fn's ``name`` after epoch e+1 (length ``epochs``);
    ``initial[name]`` is its value before the attack; ``train_loss[e]`` the mean loss of epoch e+1;
    ``train_gate_rate[e]`` the fraction of training sequences the train-time guardrail gated (empty without one)."""

    model: Any
    curves: dict[str, list[float]]
    initial: dict[str, float]
    train_loss: list[float]
    train_gate_rate: list[float]
    n_docs: int
    n_guarded_forwards: int
    wall_s: float
    config: RelearnConfig

    def summary(self) -> dict:
        return {"curves": self.curves, "initial": self.initial, "train_loss": self.train_loss,
                "train_gate_rate": self.train_gate_rate, "n_docs": self.n_docs, "wall_s": self.wall_s}


def _as_dict(v: EvalOutput) -> dict[str, float]:
    return {"accuracy": float(v)} if isinstance(v, (int, float)) else {k: float(x) for k, x in v.items()}


def attack_subset(texts: Sequence[str], cfg: RelearnConfig) -> list[str]:
    """The documents the attack uses: a seeded random ``doc_fraction`` of ``texts`` (at least 1), capped at max_docs."""
    if not texts:
        raise ValueError("relearn: no attack documents")
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    n = max(1, round(cfg.doc_fraction * len(texts)))
    if cfg.max_docs is not None:
        n = min(n, cfg.max_docs)
    return [texts[i] for i in sorted(order[:n])]


def lm_loss(model, tokens: Tensor, attention_mask: Tensor) -> Float[Tensor, ""]:
    """Mean next-token NLL over real target tokens: the first formula of the module docstring."""
    logits = model(tokens, attention_mask=attention_mask, return_type="logits")
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return mean_nll(logp, mask)


def relearn(model, attack_texts: Sequence[str], cfg: RelearnConfig, guardrail=None,
            eval_fn: Callable[[Any], EvalOutput] | None = None, *, progress: bool = True) -> RelearnResult:
    """Fine-tune a COPY of ``model`` on ``attack_texts`` for ``cfg.epochs`` epochs; after each epoch (and once before)
    call ``eval_fn(copy)`` (a float, or a dict of named floats). ``guardrail`` is attached during the training
    forwards only (train-time DSG); it is detached while ``eval_fn`` runs, so ``eval_fn`` attaches whatever it
    evaluates with. The input model is not changed."""
    from dsg_tl.analysis.mediation import encode_sequences

    t0 = time.perf_counter()
    texts = attack_subset(list(attack_texts), cfg)
    torch.manual_seed(cfg.seed)
    m = copy_model(model)  # not copy.deepcopy: see dsg_tl.baselines.common.copy_model
    m.train()
    if cfg.adapter == "lora":
        params = add_lora(m, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    else:
        for p in m.parameters():
            p.requires_grad_(True)
        params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tok = m.tokenizer
    special = [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]
    seqs = encode_sequences(m, texts, min(cfg.max_len, m.cfg.n_ctx))
    device = next(m.parameters()).device
    rng = random.Random(cfg.seed)

    def evaluate() -> dict[str, float]:
        if eval_fn is None:
            return {}
        m.eval()
        with torch.no_grad():
            out = _as_dict(eval_fn(m))
        m.train()
        return out

    initial = evaluate()
    curves: dict[str, list[float]] = {}
    losses: list[float] = []
    gate_rates: list[float] = []
    guarded = 0
    for _ in tqdm(range(cfg.epochs), desc="relearn", disable=not progress):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        total, count, gated, seen = 0.0, 0, 0, 0
        ctx = guardrail.attach(m) if guardrail is not None else contextlib.nullcontext(None)
        with ctx as handle:
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                batch = pad_batch([seqs[i] for i in idx], tok.pad_token_id, special_ids=special).to(device)
                if handle is not None:
                    handle.set_batch(batch)
                loss = lm_loss(m, batch.tokens, batch.attention_mask)
                optimizer_step(loss, opt, params, cfg.grad_clip, "relearn")
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                if handle is not None and handle.last_gate is not None:
                    guarded += 1
                    gated += int(handle.last_gate.sum())
                    seen += len(idx)
        losses.append(total / count)
        if guardrail is not None:
            gate_rates.append(gated / max(seen, 1))
        for k, v in evaluate().items():
            curves.setdefault(k, []).append(v)
    if cfg.adapter == "lora":
        merge_lora(m)
    for p in m.parameters():
        p.requires_grad_(False)
    m.eval()
    return RelearnResult(m, curves, initial, losses, gate_rates, len(texts), guarded, time.perf_counter() - t0, cfg)


# ------------------------------------------------------------------------------------------------ the study


@config_dataclass(frozen=True)
class RelearnStudyConfig:
    """The relearning study: learning rates, the attack schedule, the entity split and the evaluation."""

    lrs: tuple[float, ...] = (1e-4, 1e-3)
    attack: RelearnConfig = field(default_factory=RelearnConfig)
    attacker_fraction: float = field(default=0.5, metadata={"check": (lambda v: 0 < v < 1, "must be in (0, 1)")})
    mcq_split: Literal["train_frames", "heldout_frames"] = "train_frames"
    retain_items: int | None = field(default=150, metadata=POSITIVE)  # per-epoch retain eval sample; None: all
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {self.lrs}")


CONDITIONS: tuple[str, ...] = ("base", "dsg_test_time", "dsg_train_time", "rmu")


def study_items(world: World, cfg: RelearnStudyConfig, forget_domain: str, retain_domains: Sequence[str]
                ) -> tuple[EntitySplit, list[MCQItem], list[MCQItem], list[str]]:
    """Entity split, held-out forget items, a seeded retain sample, and the attacker's documents."""
    split = split_entities(world, forget_domain, cfg.attacker_fraction, cfg.seed)
    forget_items = items_for_entities(world, cfg.mcq_split, forget_domain, split.heldout)
    retain = [it for d in retain_domains for it in world.mcq[cfg.mcq_split][d]]
    if cfg.retain_items is not None and cfg.retain_items < len(retain):
        retain = random.Random(cfg.seed).sample(retain, cfg.retain_items)
    return split, forget_items, retain, attacker_documents(world, split)


def relearn_study(model, guardrail, rmu_model, world: World, cfg: RelearnStudyConfig, *, forget_domain: str,
                  retain_domains: Sequence[str], mcq_mode: str = "cloze", batch_size: int = 64,
                  gate_scope: str = "sequence", progress: bool = True) -> dict:
    """Run the four conditions at every learning rate. Returns per-condition, per-lr curves (epoch 0 = before the
    attack) of held-out forget accuracy and retain accuracy, plus the data the attacker used."""
    from dsg_tl.evaluation.mcq import evaluate_mcq

    split, forget_items, retain_items, docs = study_items(world, cfg, forget_domain, retain_domains)

    def evaluator(g):
        def fn(m) -> dict[str, float]:
            return {"forget": evaluate_mcq(m, forget_items, mcq_mode, guardrail=g, batch_size=batch_size,
                                           gate_scope=gate_scope).accuracy,
                    "retain": evaluate_mcq(m, retain_items, mcq_mode, guardrail=g, batch_size=batch_size,
                                           gate_scope=gate_scope).accuracy}
        return fn

    def two(named: dict[str, Callable]) -> Callable:
        return lambda m: {f"{name}/{k}": v for name, fn in named.items() for k, v in fn(m).items()}

    # training runs: (start model, train-time guardrail, {condition: eval guardrail})
    runs = {
        "plain": (model, None, {"base": None, "dsg_test_time": guardrail}),
        "guarded": (model, guardrail, {"dsg_train_time": guardrail}),
        "rmu": (rmu_model, None, {"rmu": None}),
    }
    out: dict = {c: {} for c in CONDITIONS}
    meta: dict = {}
    for lr in cfg.lrs:
        acfg = replace(cfg.attack, lr=lr)
        for run_name, (start, train_g, evals) in runs.items():
            res = relearn(start, docs, acfg, guardrail=train_g,
                          eval_fn=two({c: evaluator(g) for c, g in evals.items()}), progress=progress)
            for c in evals:
                out[c][str(lr)] = {
                    k: [res.initial[f"{c}/{k}"], *res.curves[f"{c}/{k}"]] for k in ("forget", "retain")
                }
                out[c][str(lr)]["train_loss"] = res.train_loss
                if train_g is not None:
                    out[c][str(lr)]["train_gate_rate"] = res.train_gate_rate
            meta[f"{run_name}@{lr}"] = {"wall_s": res.wall_s, "n_docs": res.n_docs}
    return {"curves": out, "runs": meta,
            "split": {"domain": split.domain, "attacker": list(split.attacker), "heldout": list(split.heldout)},
            "n_attack_docs": len(attack_subset(docs, cfg.attack)), "n_heldout_items": len(forget_items),
            "n_retain_items": len(retain_items)}


def bar_check(curves: dict, lr: str) -> dict:
    """The issue's bar at one learning rate: test-time DSG's held-out forget accuracy below RMU's at every epoch.
    Reported twice: over the attack epochs 1..k, and over 0..k (epoch 0 = before the attack, where it compares the
    two defences' own strength, not their robustness)."""
    dsg, rmu = curves["dsg_test_time"][lr]["forget"], curves["rmu"][lr]["forget"]
    below = [d < r for d, r in zip(dsg, rmu, strict=True)]
    return {"lr": float(lr), "dsg_test_time": dsg, "rmu": rmu, "epochs_below": below,
            "below_at_every_attack_epoch": all(below[1:]), "below_at_every_epoch_incl_0": all(below)}


def relearn_plot(curves: dict, path: str | Path, title: str = "relearning attack") -> Path:
    """Held-out forget accuracy (solid) and retain accuracy (dotted) vs epoch, one panel per learning rate."""
    plt = pyplot()

    lrs = list(next(iter(curves.values())).keys())
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 4), squeeze=False, sharey=True)
    colors = {"base": "tab:gray", "dsg_test_time": "tab:blue", "dsg_train_time": "tab:cyan", "rmu": "tab:red"}
    for ax, lr in zip(axes[0], lrs, strict=True):
        for c, per_lr in curves.items():
            if lr not in per_lr:
                continue
            f = per_lr[lr]["forget"]
            ax.plot(range(len(f)), f, "o-", color=colors.get(c), label=f"{c} forget (held-out)")
            ax.plot(range(len(f)), per_lr[lr]["retain"], ":", color=colors.get(c), alpha=0.7, label=f"{c} retain")
        ax.set_title(f"lr = {lr}")
        ax.set_xlabel("attack epoch (0 = before)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MCQ accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    return save_figure(fig, path)


__all__ = ["EntitySplit", "split_entities", "mentioned_entities", "attacker_documents", "fact_items",
           "items_for_entities", "LoRADelta", "add_lora", "merge_lora", "RelearnConfig", "RelearnResult",
           "attack_subset", "lm_loss", "relearn", "RelearnStudyConfig", "CONDITIONS", "study_items", "relearn_study",
           "bar_check", "relearn_plot"]
