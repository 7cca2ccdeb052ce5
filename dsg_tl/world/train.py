"""Train the world's tiny language model and its SAE on CPU."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from tqdm.auto import tqdm

from dsg_tl.config import POSITIVE, dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training schedule of the world's HookedTransformer."""

    n_layers: int = field(default=4, metadata=POSITIVE)
    d_model: int = field(default=128, metadata=POSITIVE)
    n_heads: int = field(default=4, metadata=POSITIVE)
    d_mlp: int = field(default=512, metadata=POSITIVE)
    n_ctx: int = field(default=128, metadata=POSITIVE)
    steps: int = field(default=900, metadata=POSITIVE)
    batch_size: int = field(default=32, metadata=POSITIVE)
    lr: float = field(default=2e-3, metadata=POSITIVE)
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")


@dataclass(frozen=True)
class SAETrainConfig:
    """The SAE trained on ``blocks.{layer}.hook_resid_post``."""

    architecture: Literal["standard", "jumprelu", "topk"] = "standard"
    layer: int = field(default=1, metadata={"check": (lambda v: v >= 0, "must be >= 0")})
    d_sae: int = field(default=2048, metadata=POSITIVE)
    k: int = field(default=16, metadata=POSITIVE)  # topk only
    l1_coefficient: float = 2.5  # standard only
    l0_coefficient: float = 1.0  # jumprelu only
    epochs: int = field(default=6, metadata=POSITIVE)
    batch_tokens: int = field(default=1024, metadata=POSITIVE)
    lr: float = field(default=1e-3, metadata=POSITIVE)
    seed: int = 0

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"


def hooked_config(cfg: ModelConfig, d_vocab: int):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        device="cpu",
        seed=cfg.seed,
    )


def pack_documents(
    docs_ids: list[list[int]], n_ctx: int, bos_id: int, eos_id: int, pad_id: int, seed: int
) -> torch.Tensor:
    """Pack whole documents into rows ``BOS doc EOS doc EOS ... PAD``; every row starts with a fresh document."""
    order = list(range(len(docs_ids)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    row = [bos_id]
    for i in order:
        doc = docs_ids[i][: n_ctx - 2] + [eos_id]
        if len(row) + len(doc) > n_ctx:
            rows.append(row + [pad_id] * (n_ctx - len(row)))
            row = [bos_id]
        row.extend(doc)
    if len(row) > 1:
        rows.append(row + [pad_id] * (n_ctx - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def train_language_model(
    model, rows: torch.Tensor, cfg: ModelConfig, pad_id: int, log: Callable[[dict], None] | None = None
) -> list[float]:
    """Next-token training (padding masked) with AdamW, linear warm-up and cosine decay. Returns the loss curve."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="train LM", unit="step")
    for step in bar:
        idx = torch.randint(0, rows.shape[0], (cfg.batch_size,), generator=gen)
        batch = rows[idx]
        logits = model(batch, return_type="logits")
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log({"lm/loss": loss.item(), "lm/step": step})
    model.eval()
    return losses


@torch.no_grad()
def collect_activations(model, rows: torch.Tensor, hook_name: str, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Residual activations at ``hook_name`` on every real (non-BOS, non-pad) token, stopping at that layer."""
    layer = int(hook_name.split(".")[1])
    out = []
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i : i + batch_size]
        _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=layer + 1)
        acts = cache[hook_name]
        mask = batch != pad_id
        mask[:, 0] = False
        out.append(acts[mask])
    return torch.cat(out)


def _batches(acts: torch.Tensor, batch: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(acts.shape[0], generator=gen)
        for i in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[perm[i : i + batch]]


def train_sae(acts: torch.Tensor, cfg: SAETrainConfig, model_name: str = "dsg-world"):
    """Train an SAE of the configured architecture with sae-lens's SAETrainer; return the inference SAE."""
    from sae_lens import (
        SAE,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        LoggingConfig,
        SAETrainer,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(cfg.seed)
    d_in = acts.shape[1]
    meta = SAEMetadata(hook_name=cfg.hook_name, model_name=model_name)
    if cfg.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, metadata=meta))
    elif cfg.architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, l0_coefficient=cfg.l0_coefficient, metadata=meta)
        )
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, l1_coefficient=cfg.l1_coefficient, metadata=meta)
        )
    # initialise the decoder bias at the data mean (standard practice; speeds up training on tiny data)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    n_batches = (acts.shape[0] // cfg.batch_tokens) * cfg.epochs
    total = n_batches * cfg.batch_tokens
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=cfg.batch_tokens,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, n_batches // 20),
        lr_decay_steps=n_batches // 2,
        dead_feature_window=max(50, n_batches // 4),
        feature_sampling_window=max(100, n_batches // 2),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
    )
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(acts, cfg.batch_tokens, cfg.epochs, cfg.seed)).fit()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device="cpu")
    return inference.eval()
