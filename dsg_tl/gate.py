"""The dynamic classifier (gate): rho per sequence and its Neyman-Pearson threshold.

A content token is forget-activated if ANY selected latent is > 0 there.
rho(x) = (# forget-activated tokens counted by the gate mask) / (# tokens in the gate mask), per sequence
         (BOS and padding are never counted; a sequence with no counted token has rho = 0).
tau    = the p_dyn-th percentile of rho over retain calibration sequences; the gate fires iff rho > tau.
This is a level-alpha test of H0 = retain with alpha = 1 - p_dyn / 100.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Bool, Float
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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gate_report(
    tau: float, p_dyn: float, n_calibration: int, heldout_retain_rho: Tensor, forget_rho: Tensor
) -> GateReport:
    return GateReport(
        tau=tau,
        alpha=1 - p_dyn / 100,
        retain_fpr=float((heldout_retain_rho > tau).float().mean()),
        forget_tpr=float((forget_rho > tau).float().mean()),
        n_calibration=n_calibration,
        n_heldout=len(heldout_retain_rho),
        n_forget=len(forget_rho),
    )
