"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, the WMDP paper).

Fine-tune the MLP weights of a few layers at or below layer L so that the residual stream after block L
(``blocks.{L}.hook_resid_post``) on forget tokens moves to a fixed random direction scaled by the steering
coefficient, while on retain tokens it stays where the frozen model puts it:

    u = r / ||r||,  r ~ Uniform[0, 1)^d_model   (fixed, seeded; as in the reference code)
    L = MSE(h_L(forget), c u) + alpha * MSE(h_L(retain), h_L^frozen(retain))
    MSE(a, b) = sum over counted tokens t of ||a_t - b_t||^2 / (n_tokens * d_model)

The per-element mean is the reference code's ``mse_loss``; it divides both terms by the same d_model, so alpha keeps
its meaning. Counted tokens exclude BOS, EOS and padding. The frozen model is the caller's model (never modified).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dsg_tl.baselines.common import (
    TrainConfig,
    UnlearnResult,
    content_mask,
    editable_copy,
    forget_retain_streams,
    measure,
    model_device,
    train_loop,
)
from dsg_tl.config import NON_NEGATIVE, POSITIVE, ConfigError, field
from dsg_tl.config import dataclass as config_dataclass

MLP_PARAMS = ("W_in", "b_in", "W_out", "b_out", "W_gate")


@config_dataclass(frozen=True)
class RMUConfig(TrainConfig):
    """RMU hyperparameters. Defaults: the DSG paper's gemma-2-2b setting (layer 3, lr 5e-6, steering 400, alpha 100,
    400 steps; the layers updated are L-2..L, the parameter the reference code updates is the MLP's down projection,
    ``W_out`` here)."""

    lr: float = field(default=5e-6, metadata=POSITIVE)
    batch_size: int = field(default=4, metadata=POSITIVE)
    chunk_len: int = field(default=512, metadata={"check": (lambda v: v >= 4, "must be >= 4")})
    layer: int = field(default=3, metadata=NON_NEGATIVE)
    update_layers: tuple[int, ...] | None = None  # None: (L-2, L-1, L), those >= 0
    mlp_params: tuple[str, ...] = ("W_out",)
    steering_coeff: float = field(default=400.0, metadata=POSITIVE)
    alpha: float = field(default=100.0, metadata=NON_NEGATIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [p for p in self.mlp_params if p not in MLP_PARAMS]
        if bad or not self.mlp_params:
            raise ConfigError(f"mlp_params: {list(self.mlp_params)} must be a non-empty subset of {list(MLP_PARAMS)}")
        if self.update_layers is not None:
            if not self.update_layers:
                raise ConfigError("update_layers: must be non-empty (or null for L-2..L)")
            wrong = [i for i in self.update_layers if not 0 <= i <= self.layer]
            if wrong:
                raise ConfigError(f"update_layers: {wrong} outside [0, layer={self.layer}] (layers above L cannot "
                                  f"change h_L)")

    @property
    def layers_updated(self) -> tuple[int, ...]:
        if self.update_layers is not None:
            return tuple(sorted(set(self.update_layers)))
        return tuple(i for i in (self.layer - 2, self.layer - 1, self.layer) if i >= 0)


# The paper's grid on gemma-2-2b (real models) and a grid scaled to the world (4 layers, d_model 128; mean residual
# norm on world text 16.7 at blocks.1, 19.5 at blocks.2, so c = 40 is about 2.4x the norm). A first exploration on the
# world (80 steps, lr 3e-3, 1/3 of the train-frame MCQs): alpha 100 barely moved forget accuracy (0.94 -> 0.82),
# alpha 10 gave 0.48 at retain 0.98 (layer 1) and 0.50 (layer 2); lr 1e-2 or c = 100 cost retain accuracy.
# WORLD_RMU is the grid's best point with retain >= 0.98 x base in analyses/baselines.py (layer 2, c 40).
PAPER_RMU = RMUConfig()
PAPER_GRID: dict[str, tuple] = {"steering_coeff": (100.0, 400.0, 1000.0), "alpha": (100.0, 500.0),
                                "steps": (400, 800)}
WORLD_RMU = RMUConfig(layer=2, lr=3e-3, steering_coeff=40.0, alpha=10.0, steps=80, batch_size=8, chunk_len=64)
WORLD_GRID: dict[str, tuple] = {"layer": (1, 2), "steering_coeff": (40.0, 100.0)}


def random_direction(d_model: int, seed: int) -> Float[Tensor, " d_model"]:
    """u = r / ||r|| with r ~ Uniform[0, 1)^d (seeded), the reference code's control vector direction."""
    r = torch.rand(d_model, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def masked_mse(a: Float[Tensor, "batch pos d"], b: Float[Tensor, "batch pos d"] | Float[Tensor, " d"],
               mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """sum_{t in mask} ||a_t - b_t||^2 / (|mask| * d)."""
    sq = ((a - b) ** 2).sum(-1)
    return (sq * mask).sum() / (mask.sum().clamp(min=1) * a.shape[-1])


def rmu_loss(h_forget: Float[Tensor, "batch pos d"], h_retain: Float[Tensor, "batch pos d"],
             h_retain_frozen: Float[Tensor, "batch pos d"], control: Float[Tensor, " d"],
             mask_forget: Bool[Tensor, "batch pos"], mask_retain: Bool[Tensor, "batch pos"],
             alpha: float) -> tuple[Float[Tensor, ""], Float[Tensor, ""], Float[Tensor, ""]]:
    """(total, forget term, retain term) with total = MSE(h_f, c u) + alpha * MSE(h_r, h_r^frozen)."""
    forget = masked_mse(h_forget, control, mask_forget)
    retain = masked_mse(h_retain, h_retain_frozen, mask_retain)
    return forget + alpha * retain, forget, retain


def resid_at(model, tokens, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """Residual stream after block ``layer`` (``blocks.{layer}.hook_resid_post``); the forward stops there."""
    return model(tokens, stop_at_layer=layer + 1)


def apply_rmu(model, forget_texts: Sequence[str], retain_texts: Sequence[str], cfg: RMUConfig, *,
              progress: bool = True) -> UnlearnResult:
    """RMU on a deep copy of ``model``; ``model`` itself is the frozen reference and is left unchanged."""
    n_layers = model.cfg.n_layers
    if cfg.layer >= n_layers:
        raise ConfigError(f"layer: {cfg.layer} but the model has {n_layers} layers")
    tok = model.tokenizer
    device = model_device(model)
    with measure(device) as cost:
        forget, retain = forget_retain_streams(tok, forget_texts, retain_texts, cfg)
        names = {f"blocks.{i}.mlp.{p}" for i in cfg.layers_updated for p in cfg.mlp_params}
        new = editable_copy(model, lambda n: n in names)
        control = (cfg.steering_coeff * random_direction(model.cfg.d_model, cfg.seed)).to(device)

        def step_loss(_step: int):
            f = next(forget).to(device)
            r = next(retain).to(device)
            with torch.no_grad():
                h_frozen = resid_at(model, r, cfg.layer)
            total, lf, lr = rmu_loss(resid_at(new, f, cfg.layer), resid_at(new, r, cfg.layer), h_frozen, control,
                                     content_mask(f, tok).to(device), content_mask(r, tok).to(device), cfg.alpha)
            return total, {"forget": lf.item(), "retain": lr.item()}

        losses, terms = train_loop(new, step_loss, cfg, desc=f"RMU L{cfg.layer}", progress=progress)
    return UnlearnResult.of(new, cost, losses, terms, cfg)


__all__ = ["RMUConfig", "apply_rmu", "rmu_loss", "masked_mse", "random_direction", "PAPER_RMU", "PAPER_GRID",
           "WORLD_RMU", "WORLD_GRID", "MLP_PARAMS"]
