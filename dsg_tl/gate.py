"""The dynamic classifier (gate): rho per sequence and its Neyman-Pearson threshold.

A content token is forget-activated if ANY selected latent is > 0 there.
rho(x) = (# forget-activated tokens counted by the gate mask) / (# tokens in the gate mask), per sequence
         (BOS and padding are never counted; a sequence with no counted token has rho = 0).
tau    = the p_dyn-th percentile of rho over retain calibration sequences; the gate fires iff rho > tau.
This is a level-alpha test of H0 = retain with alpha = 1 - p_dyn / 100.

Gate variants (:class:`GateSpec`, below) threshold other statistics of the same firing vector (a windowed
fraction, a per-turn fraction, or the fraction OR a raw count), calibrated the same way; see ``gate_statistic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dsg_tl.selection import percentile


def rho(fire: Bool[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    counted = mask.sum(-1)
    return (fire & mask).sum(-1).float() / counted.clamp(min=1).float()


def calibrate_tau(retain_rho: Tensor, p_dyn: float) -> float:
    """tau = p_dyn-th percentile of rho on retain calibration sequences."""
    return percentile(retain_rho, p_dyn)


@dataclass(frozen=True)
class GateReport:
    tau: float
    alpha: float
    retain_fpr: float
    forget_tpr: float
    n_calibration: int
    n_heldout: int
    n_forget: int
    gate: str = "fraction"  # the gate variant (GateSpec.kind)
    k_min: int | None = None  # hybrid gate: the count threshold

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.gate == "fraction":  # the fraction gate's report keeps its original keys
            d.pop("gate")
            d.pop("k_min")
        return d


def gate_report(
    tau: float, p_dyn: float, n_calibration: int, heldout_retain_rho: Tensor, forget_rho: Tensor, *,
    spec: GateSpec | None = None, heldout_count: Tensor | None = None, forget_count: Tensor | None = None,
) -> GateReport:
    """FPR on held-out retain and TPR on forget sequences of the gate ``stat > tau`` (hybrid: or count >= k_min)."""
    spec = spec or GateSpec()

    def rate(stat: Tensor, count: Tensor | None) -> float:
        if len(stat) == 0:
            return float("nan")
        if count is None:
            count = torch.zeros(len(stat), dtype=torch.long)
        return float(gate_decision(spec, tau, stat, count).float().mean())

    return GateReport(
        tau=tau,
        alpha=1 - p_dyn / 100,
        retain_fpr=rate(heldout_retain_rho, heldout_count),
        forget_tpr=rate(forget_rho, forget_count),
        n_calibration=n_calibration,
        n_heldout=len(heldout_retain_rho),
        n_forget=len(forget_rho),
        gate=spec.kind,
        k_min=spec.k_min if spec.kind == "hybrid" else None,
    )


# ---------------------------------------------------------------------------------------------------- gate variants
# The statistic s(x) a gate thresholds, computed from the per-token firing vector ``fire`` and the counting mask
# ``mask`` (BOS, EOS, padding and, with a gate scope, non-question tokens are False), per sequence:
#   fraction  s = rho = #(fire & mask) / #mask                                        (the paper's gate)
#   windowed  s = max over windows of w consecutive COUNTED tokens of the fraction of firing tokens in the window;
#             a sequence with fewer than w counted tokens has s = rho (padding, BOS and other uncounted positions
#             are skipped, so windows do not depend on padding side)
#   per_turn  s = max over turns of the turn's rho; turns are the runs of tokens between separator tokens (a
#             separator token belongs to no turn and is never counted); a turn without counted tokens has s = 0
#   hybrid    s = rho, and the gate also fires when the raw count #(fire & mask) >= k_min
# The gate fires iff s > tau (hybrid: s > tau OR count >= k_min). Every variant is calibrated the same
# Neyman-Pearson way on retain calibration sequences (see calibrate_gate).

GateKind = Literal["fraction", "windowed", "per_turn", "hybrid"]
GATE_KINDS: tuple[str, ...] = ("fraction", "windowed", "per_turn", "hybrid")


@dataclass(frozen=True)
class GateSpec:
    """Which statistic the gate thresholds, and its parameters (``tau`` lives on the Guardrail)."""

    kind: GateKind = "fraction"
    window: int = 16  # windowed: tokens per window
    k_min: int | None = None  # hybrid: raw-count threshold (set by calibration)
    separator_ids: tuple[int, ...] = ()  # per_turn: token ids that separate turns

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if int(self.window) < 1:
            raise ValueError(f"gate window must be >= 1 token, got {self.window}")
        if self.k_min is not None and int(self.k_min) < 1:
            raise ValueError(f"hybrid gate k_min must be >= 1, got {self.k_min}")
        if self.kind == "per_turn" and not self.separator_ids:
            raise ValueError("a per_turn gate needs separator_ids (the token ids that separate turns)")
        object.__setattr__(self, "separator_ids", tuple(int(i) for i in self.separator_ids))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "window": int(self.window), "k_min": self.k_min,
                "separator_ids": list(self.separator_ids)}

    @classmethod
    def from_dict(cls, d: dict | None) -> GateSpec:
        """A spec from ``to_dict`` output; None (files written before gate variants existed) is the fraction gate."""
        if d is None:
            return cls()
        unknown = set(d) - {"kind", "window", "k_min", "separator_ids"}
        if unknown:
            raise ValueError(f"unknown gate spec keys {sorted(unknown)}")
        return cls(kind=d.get("kind", "fraction"), window=int(d.get("window", 16)), k_min=d.get("k_min"),
                   separator_ids=tuple(d.get("separator_ids", ())))


def fired_count(fire: Bool[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """#(fire & mask) per sequence: the raw count of firing counted tokens."""
    return (fire & mask).sum(-1)


def windowed_rho(fire: Bool[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], window: int
                 ) -> Float[Tensor, " batch"]:
    """max over windows of ``window`` consecutive counted tokens of their firing fraction (rho if fewer counted)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    b, p = fire.shape
    # move the counted tokens to the left, keeping their order (stable sort on "not counted")
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    f = (fire & mask).gather(1, order).float()
    n = mask.sum(-1)
    if p < window:
        return rho(fire, mask)
    c = torch.cat([torch.zeros(b, 1, dtype=f.dtype, device=f.device), f.cumsum(-1)], -1)
    sums = c[:, window:] - c[:, :-window]  # [b, p - window + 1]: window starting at counted index i
    start = torch.arange(sums.shape[1], device=f.device)
    valid = start[None, :] + window <= n[:, None]
    best = torch.where(valid, sums, torch.full_like(sums, -1.0)).max(-1).values / window
    return torch.where(n >= window, best, rho(fire, mask))


def turn_ids(tokens: Int[Tensor, "batch pos"], separator_ids) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Turn index of each position (= number of separators before it) and the separator positions."""
    sep = torch.isin(tokens, torch.as_tensor(list(separator_ids), dtype=tokens.dtype, device=tokens.device))
    return torch.cumsum(sep.long(), -1) - sep.long(), sep


def per_turn_rho(fire: Bool[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], turns: Int[Tensor, "batch pos"],
                 separators: Bool[Tensor, "batch pos"] | None = None) -> Float[Tensor, " batch"]:
    """max over turns of (# firing counted tokens in the turn) / (# counted tokens in the turn); separators excluded."""
    m = mask if separators is None else mask & ~separators
    n_turns = int(turns.max()) + 1 if turns.numel() else 1
    fired = torch.zeros(fire.shape[0], n_turns, device=fire.device).scatter_add_(1, turns, (fire & m).float())
    counted = torch.zeros(fire.shape[0], n_turns, device=fire.device).scatter_add_(1, turns, m.float())
    frac = torch.where(counted > 0, fired / counted.clamp(min=1), torch.zeros_like(fired))
    return frac.max(-1).values


def gate_statistic(spec: GateSpec, fire: Bool[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
                   tokens: Int[Tensor, "batch pos"] | None = None) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """(the variant's statistic s, the raw count) per sequence; ``tokens`` are needed for per_turn (separators)."""
    count = fired_count(fire, mask)
    if spec.kind in ("fraction", "hybrid"):
        return rho(fire, mask), count
    if spec.kind == "windowed":
        return windowed_rho(fire, mask, spec.window), count
    if tokens is None:
        raise ValueError("the per_turn gate needs the token ids (to find turn separators): call set_batch() with "
                         "the batch you run")
    turns, sep = turn_ids(tokens, spec.separator_ids)
    return per_turn_rho(fire, mask, turns, sep), count


def gate_decision(spec: GateSpec, tau: float, stat: Float[Tensor, " batch"], count: Int[Tensor, " batch"]
                  ) -> Bool[Tensor, " batch"]:
    """s > tau; for hybrid also count >= k_min (an uncalibrated hybrid, k_min None, uses the fraction part only)."""
    gated = stat > tau
    if spec.kind == "hybrid" and spec.k_min is not None:
        gated = gated | (count >= spec.k_min)
    return gated


def calibrate_hybrid(retain_stat: Tensor, retain_count: Tensor, alpha: float) -> tuple[int, float]:
    """(k_min, tau) for the hybrid gate at level alpha on the calibration sequences.

    Rule: the count test gets alpha/2: k_min = the smallest k >= 1 with #(count >= k) <= floor(n alpha / 2). The
    fraction test gets the rest of the budget: with A = {count >= k_min} and m = floor(n alpha) - |A|, tau = the
    (m+1)-th largest rho among the sequences outside A (tau = -1 if m >= their number), so that on the calibration
    set #(count >= k_min OR rho > tau) <= floor(n alpha), i.e. the empirical FPR is <= alpha.
    """
    n = len(retain_count)
    if n == 0:
        raise ValueError("calibrating a hybrid gate needs calibration sequences")
    counts = retain_count.long()
    budget_count = int(n * alpha / 2 + 1e-9)
    k = 1
    while int((counts >= k).sum()) > budget_count:
        k += 1
    outside = counts < k
    m = int(n * alpha + 1e-9) - int((~outside).sum())
    rest = torch.sort(retain_stat[outside].double(), descending=True).values
    tau = float(rest[m]) if m < len(rest) else -1.0
    return k, tau
