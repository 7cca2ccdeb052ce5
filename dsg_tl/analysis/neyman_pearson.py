"""The gate as a Neyman-Pearson test: ROC/AUC, TPR at level alpha, bootstrap of tau and of the FPR, TVD, MLR check.

H0 = retain, H1 = forget, statistic rho (fraction of forget-activated content tokens). The gate fires iff rho > tau
with tau = the p_dyn-th percentile (linear interpolation, ``dsg_tl.selection.percentile``) of rho on retain
calibration sequences, so its nominal false-positive rate is alpha = 1 - p_dyn / 100. The test is the most powerful
level-alpha test when the likelihood ratio p_forget(rho) / p_retain(rho) is non-decreasing in rho (MLR);
``likelihood_ratio_check`` looks at that assumption empirically.

Conventions: "positive iff score > t" everywhere (ties at the threshold are negative), as in the gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float, Real
from torch import Tensor

from dsg_tl.plotting import pyplot, save_figure
from dsg_tl.selection import percentile

__all__ = [
    "BootstrapResult",
    "FPRInterval",
    "MLRReport",
    "OperatingPoint",
    "auc",
    "bootstrap_tau",
    "fpr_interval",
    "gate_analysis",
    "likelihood_ratio_check",
    "rho_histogram_plot",
    "roc_curve",
    "roc_plot",
    "statistic_separation",
    "total_variation",
    "tpr_at_alpha",
]

# rows of a (replicates x sample) block handled at once by the bootstrap (bounds memory, and torch.quantile's size)
_BLOCK_ELEMENTS = 1 << 21


def _scores(x: Tensor, name: str) -> Tensor:
    """A 1-D float64 copy of x; refuses empty input and NaN."""
    x = torch.as_tensor(x).detach().flatten().to(torch.float64).cpu()
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _count_above(sorted_x: Tensor, t: Tensor) -> Tensor:
    """#{x > t} for each t, given x sorted ascending."""
    return sorted_x.numel() - torch.searchsorted(sorted_x, t, right=True)


def _check_p_dyn(p_dyn: float) -> None:
    if not 0.0 <= p_dyn <= 100.0:
        raise ValueError(f"p_dyn must be in [0, 100], got {p_dyn}")


# ---------------------------------------------------------------------------------------------------------- ROC / AUC


def roc_curve(
    neg_scores: Real[Tensor, " n_neg"], pos_scores: Real[Tensor, " n_pos"]
) -> tuple[Float[Tensor, " k"], Float[Tensor, " k"], Float[Tensor, " k"]]:
    """ROC of the rule "positive iff score > t" (float64 tensors).

    thresholds = [+inf, distinct scores descending..., -inf];
    fpr(t) = #{neg > t} / n_neg, tpr(t) = #{pos > t} / n_pos.
    The first point is (0, 0) (t = +inf), the last (1, 1) (t = -inf); fpr and tpr are non-decreasing, and the
    trapezoid area under (fpr, tpr) equals ``auc`` exactly (ties count one half).
    """
    neg, pos = _scores(neg_scores, "neg_scores"), _scores(pos_scores, "pos_scores")
    values = torch.unique(torch.cat([neg, pos])).flip(0)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    thresholds = torch.cat([inf, values, -inf])
    fpr = _count_above(neg.sort().values, thresholds).double() / neg.numel()
    tpr = _count_above(pos.sort().values, thresholds).double() / pos.numel()
    return fpr, tpr, thresholds


def auc(neg_scores: Real[Tensor, " n_neg"], pos_scores: Real[Tensor, " n_pos"]) -> float:
    """AUC = P(pos > neg) + 0.5 P(pos == neg) over all (pos, neg) pairs (Mann-Whitney U / (n_pos n_neg)).

    Exact with ties: sum over pos of (2 #{neg < p} + #{neg == p}) / (2 n_pos n_neg), counts in int64.
    """
    neg, pos = _scores(neg_scores, "neg_scores"), _scores(pos_scores, "pos_scores")
    s = neg.sort().values
    less = torch.searchsorted(s, pos, right=False)
    less_or_equal = torch.searchsorted(s, pos, right=True)
    twice_u = int((less + less_or_equal).sum())  # 2 #{neg < p} + #{neg == p}
    return twice_u / (2 * neg.numel() * pos.numel())


# ------------------------------------------------------------------------------------------------- operating point


class OperatingPoint(NamedTuple):
    tau: float
    fpr: float  # empirical #{neg > tau} / n_neg
    tpr: float  # empirical #{pos > tau} / n_pos


def _operating_point(neg: Tensor, pos: Tensor, q: float) -> OperatingPoint:
    neg, pos = _scores(neg, "neg"), _scores(pos, "pos")
    tau = percentile(neg, q)
    return OperatingPoint(tau, float((neg > tau).double().mean()), float((pos > tau).double().mean()))


def tpr_at_alpha(neg: Real[Tensor, " n_neg"], pos: Real[Tensor, " n_pos"], alpha: float) -> OperatingPoint:
    """tau = percentile(neg, 100 (1 - alpha)) (linear interpolation); returns (tau, FPR on neg, TPR on pos).

    The FPR on neg is at most alpha up to the interpolation (and below it when neg has ties at tau).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _operating_point(neg, pos, 100.0 * (1.0 - alpha))


# -------------------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap of tau: tau on the full sample, [lo, hi] the central ci interval of ``taus``."""

    tau: float
    lo: float
    hi: float
    taus: Float[Tensor, " n_boot"]

    def to_dict(self) -> dict:
        return {"tau": self.tau, "lo": self.lo, "hi": self.hi, "n_boot": int(self.taus.numel())}


@dataclass(frozen=True)
class FPRInterval:
    """Held-out FPR of the gate at the calibrated tau, with a bootstrap interval, against the nominal alpha."""

    alpha: float  # nominal level 1 - p_dyn / 100
    tau: float  # p_dyn percentile of the full calibration sample
    fpr: float  # #{heldout > tau} / n_heldout
    lo: float
    hi: float
    nominal_inside: bool  # lo <= alpha <= hi
    fprs: Float[Tensor, " n_boot"]
    resample_heldout: bool

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "tau": self.tau, "fpr": self.fpr, "lo": self.lo, "hi": self.hi,
                "nominal_inside": self.nominal_inside, "n_boot": int(self.fprs.numel()),
                "resample_heldout": self.resample_heldout}


def _ci_bounds(values: Tensor, ci: float) -> tuple[float, float]:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    return percentile(values, 100.0 * (1.0 - ci) / 2.0), percentile(values, 100.0 * (1.0 + ci) / 2.0)


def _blocks(n: int, n_boot: int):
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, rows):
        yield min(rows, n_boot - start)


def _bootstrap_percentiles(x: Tensor, q: float, n_boot: int, gen: torch.Generator) -> Tensor:
    """q-th percentile (linear) of each of n_boot resamples of x drawn with replacement (indices from ``gen``)."""
    out = []
    for rows in _blocks(x.numel(), n_boot):
        idx = torch.randint(x.numel(), (rows, x.numel()), generator=gen)
        out.append(torch.quantile(x[idx], q / 100.0, dim=1))
    return torch.cat(out)


def bootstrap_tau(
    calibration_rho: Float[Tensor, " n"], p_dyn: float, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> BootstrapResult:
    """Percentile bootstrap of tau = percentile(calibration_rho, p_dyn).

    taus[b] = percentile(resample_b, p_dyn), resample_b = n draws with replacement (torch generator seeded by seed);
    [lo, hi] = the (1 - ci)/2 and (1 + ci)/2 percentiles of taus.
    """
    _check_p_dyn(p_dyn)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = _scores(calibration_rho, "calibration_rho")
    taus = _bootstrap_percentiles(x, p_dyn, n_boot, torch.Generator().manual_seed(seed))
    lo, hi = _ci_bounds(taus, ci)
    return BootstrapResult(percentile(x, p_dyn), lo, hi, taus)


def fpr_interval(
    calibration_rho: Float[Tensor, " n_cal"],
    heldout_rho: Float[Tensor, " n_held"],
    p_dyn: float,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    *,
    resample_heldout: bool = True,
) -> FPRInterval:
    """FPR on held-out retain at the calibrated tau, with a percentile-bootstrap interval.

    fpr = #{heldout > tau} / n_held, tau = percentile(calibration, p_dyn), alpha = 1 - p_dyn / 100.
    fprs[b] = mean(heldout_b > taus[b]) with taus[b] from ``bootstrap_tau`` (same seed, same taus). When
    ``resample_heldout`` (default) heldout_b is a resample of the held-out set too (generator seeded seed + 1), so
    the interval covers both samples' noise, which is what "the procedure reaches level alpha" needs; otherwise
    heldout_b = heldout (calibration noise only). nominal_inside = lo <= alpha <= hi.
    """
    boot = bootstrap_tau(calibration_rho, p_dyn, n_boot=n_boot, seed=seed, ci=ci)
    held = _scores(heldout_rho, "heldout_rho")
    n = held.numel()
    if resample_heldout:
        gen = torch.Generator().manual_seed(seed + 1)
        parts, start = [], 0
        for rows in _blocks(n, n_boot):
            idx = torch.randint(n, (rows, n), generator=gen)
            parts.append((held[idx] > boot.taus[start : start + rows, None]).double().mean(1))
            start += rows
        fprs = torch.cat(parts)
    else:
        fprs = _count_above(held.sort().values, boot.taus).double() / n
    lo, hi = _ci_bounds(fprs, ci)
    alpha = 1.0 - p_dyn / 100.0
    fpr = float((held > boot.tau).double().mean())
    return FPRInterval(alpha, boot.tau, fpr, lo, hi, bool(lo <= alpha <= hi), fprs, resample_heldout)


# ------------------------------------------------------------------------------------------- total variation (Fig. 12)


def _bin_index(x: Tensor, edges: Tensor) -> Tensor:
    """Bin of each x for bins [e_i, e_{i+1}) with the last bin closed [e_{k-1}, e_k] (numpy's convention)."""
    k = edges.numel() - 1
    idx = torch.bucketize(x, edges, right=True) - 1
    return idx.clamp(max=k - 1)  # x == e_k goes to the last bin (x is checked to lie within the edges)


def _histogram(x: Tensor, edges: Tensor) -> Tensor:
    return torch.bincount(_bin_index(x, edges), minlength=edges.numel() - 1).double()


def _shared_edges(a: Tensor, b: Tensor, bins: int | Tensor) -> Tensor:
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
        if not (torch.isfinite(torch.tensor([lo, hi])).all()):
            raise ValueError("equal-width bins need finite values")
        if lo == hi:
            hi = lo + 1.0
        return torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    edges = torch.as_tensor(bins).to(torch.float64).flatten()
    if edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("bin edges must be at least 2 strictly increasing values")
    for x in (a, b):
        if bool((x < edges[0]).any() or (x > edges[-1]).any()):
            raise ValueError(f"values outside the bin edges [{float(edges[0])}, {float(edges[-1])}]")
    return edges


def total_variation(a: Real[Tensor, " n_a"], b: Real[Tensor, " n_b"], bins: int | Tensor = 20) -> float:
    """TVD = 0.5 sum_i |p_i - q_i|, p and q the empirical bin frequencies of a and b on shared bins.

    ``bins``: an int (equal-width bins over the pooled range [min, max]) or explicit increasing edges (values outside
    them raise). Bins are [e_i, e_{i+1}), the last one closed. In [0, 1]; depends on the binning.
    """
    a, b = _scores(a, "a"), _scores(b, "b")
    edges = _shared_edges(a, b, bins)
    p, q = _histogram(a, edges) / a.numel(), _histogram(b, edges) / b.numel()
    return float(0.5 * (p - q).abs().sum())


def _rho_from_counts(counts: Tensor, lengths: Tensor, name: str) -> tuple[Tensor, Tensor]:
    c, n = _scores(counts, f"{name}_fire_counts"), _scores(lengths, f"{name}_lengths")
    if c.shape != n.shape:
        raise ValueError(f"{name}: {c.numel()} counts but {n.numel()} lengths")
    if bool((c < 0).any() or (c > n).any()):
        raise ValueError(f"{name}: fire counts must lie in [0, length]")
    return c, c / n.clamp(min=1)  # as dsg_tl.gate.rho: no counted token -> rho = 0


def statistic_separation(
    forget_fire_counts: Real[Tensor, " n_f"],
    forget_lengths: Real[Tensor, " n_f"],
    retain_fire_counts: Real[Tensor, " n_r"],
    retain_lengths: Real[Tensor, " n_r"],
    bins: int = 20,
) -> dict[str, float]:
    """How well the normalised rho = count / length vs the raw count separate forget from retain (paper Fig. 12).

    tvd_rho = TVD(rho_forget, rho_retain), tvd_count = TVD(count_forget, count_retain), each on ``bins``
    equal-width bins over its pooled range; also the bin-free auc_rho / auc_count (forget as positive).
    """
    cf, rf = _rho_from_counts(forget_fire_counts, forget_lengths, "forget")
    cr, rr = _rho_from_counts(retain_fire_counts, retain_lengths, "retain")
    return {"tvd_rho": total_variation(rf, rr, bins), "tvd_count": total_variation(cf, cr, bins),
            "auc_rho": auc(rr, rf), "auc_count": auc(cr, cf), "bins": bins}


# ------------------------------------------------------------------------------------------------------ MLR check


@dataclass(frozen=True)
class MLRReport:
    """Estimated likelihood ratio p_pos(bin) / p_neg(bin) on pooled-quantile bins; MLR holds if non-decreasing."""

    edges: list[float]
    neg_counts: list[int]
    pos_counts: list[int]
    likelihood_ratio: list[float]
    monotone: bool
    decreasing_bins: list[int]  # bins i with LR_i < LR_{i-1} (where the MLR assumption fails)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def likelihood_ratio_check(neg: Real[Tensor, " n_neg"], pos: Real[Tensor, " n_pos"], bins: int = 10) -> MLRReport:
    """Empirical monotone-likelihood-ratio check of rho.

    edges = distinct pooled (neg + pos) quantiles at 0, 1/bins, ..., 1 (linear; duplicates from ties dropped, so
    fewer bins may remain); bins [e_i, e_{i+1}), last closed. With K bins and add-0.5 smoothing,
    LR_i = ((c_pos,i + 0.5) / (n_pos + 0.5 K)) / ((c_neg,i + 0.5) / (n_neg + 0.5 K)).
    monotone iff LR_i >= LR_{i-1} for all i; decreasing_bins lists the i where it fails. A point check with no
    significance test: sparse bins are noisy.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    neg, pos = _scores(neg, "neg"), _scores(pos, "pos")
    pooled = torch.cat([neg, pos])
    edges = torch.unique(torch.quantile(pooled, torch.linspace(0, 1, bins + 1, dtype=torch.float64)))
    if edges.numel() < 2:  # all values equal: one bin
        edges = torch.cat([edges, edges + 1.0])
    k = edges.numel() - 1
    cn, cp = _histogram(neg, edges), _histogram(pos, edges)
    lr = ((cp + 0.5) / (pos.numel() + 0.5 * k)) / ((cn + 0.5) / (neg.numel() + 0.5 * k))
    tol = 1e-12 * lr[:-1].abs()
    decreasing = ((lr[1:] < lr[:-1] - tol).nonzero().flatten() + 1).tolist()
    return MLRReport(edges.tolist(), [int(c) for c in cn], [int(c) for c in cp], lr.tolist(),
                     not decreasing, decreasing)


# ----------------------------------------------------------------------------------------------------------- plots


def rho_histogram_plot(rhos: Mapping[str, Tensor], tau: float, path: str | Path, title: str = "") -> Path:
    """Overlaid density histograms of rho per set (shared bins over [min(0, .), max(1, .)]) and a line at tau."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    vals = {k: _scores(v, k) for k, v in rhos.items()}
    if not vals:
        raise ValueError("no rho sets to plot")
    lo = min(0.0, *(float(v.min()) for v in vals.values()))
    hi = max(1.0, *(float(v.max()) for v in vals.values()))
    edges = torch.linspace(lo, hi, 41).tolist()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in vals.items():
        ax.hist(v.numpy(), bins=edges, density=True, alpha=0.35, label=f"{name} (n={v.numel()})")
    ax.axvline(tau, color="k", ls="--", lw=1.2, label=f"tau = {tau:.4g}")
    ax.set_xlabel("rho (fraction of forget-activated tokens)")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def roc_plot(curves: Mapping[str, tuple[Tensor, Tensor, float]], alpha: float, path: str | Path,
             title: str = "ROC of the gate statistic rho") -> Path:
    """ROC curves {label: (fpr, tpr, auc)}, the chance diagonal and a vertical line at FPR = alpha."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(torch.as_tensor(fpr).numpy(), torch.as_tensor(tpr).numpy(), lw=1.5,
                label=f"{name} (AUC {area:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.axvline(alpha, color="k", ls="--", lw=1, label=f"alpha = {alpha:.3g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (retain gated)")
    ax.set_ylabel("true-positive rate (forget gated)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------- summary


def gate_analysis(
    rhos: Mapping[str, Tensor],
    *,
    calibration_key: str = "calibration",
    heldout_key: str = "heldout_retain",
    positives: Sequence[str] = ("forget",),
    negatives_for_auc: Sequence[str] = ("heldout_retain", "adjacent"),
    p_dyn: float = 95.0,
    out_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    mlr_bins: int = 10,
) -> dict:
    """The gate's Neyman-Pearson report from rho per set (e.g. the dict ``dsg_tl.calibrate.calibrate`` returns).

    tau = percentile(rhos[calibration_key], p_dyn), alpha = 1 - p_dyn / 100. Reports: tau and its bootstrap CI;
    held-out FPR with its bootstrap CI vs alpha (if ``heldout_key`` is present); gate_rate = mean(rho > tau) of
    every set; per positive set: TPR at tau, AUC against each negative present, MLR check against the held-out
    retain set (else the calibration set). Keys absent from ``rhos`` are skipped and listed in "missing".
    Writes rho_hist.png and roc.png into ``out_dir`` when given. Returns a JSON-serialisable dict.
    """
    _check_p_dyn(p_dyn)
    if calibration_key not in rhos:
        raise KeyError(f"calibration set {calibration_key!r} not in rhos (keys: {sorted(rhos)})")
    vals = {k: _scores(v, k) for k, v in rhos.items()}
    cal = vals[calibration_key]
    alpha = 1.0 - p_dyn / 100.0
    boot = bootstrap_tau(cal, p_dyn, n_boot=n_boot, seed=seed, ci=ci)
    tau = boot.tau
    wanted = [heldout_key, *positives, *negatives_for_auc]
    missing = sorted({k for k in wanted if k not in vals})
    out: dict = {
        "p_dyn": p_dyn, "alpha": alpha, "tau": tau, "tau_ci": [boot.lo, boot.hi], "ci": ci, "n_boot": n_boot,
        "seed": seed, "calibration_key": calibration_key, "heldout_key": heldout_key,
        "n": {k: int(v.numel()) for k, v in vals.items()},
        "gate_rate": {k: float((v > tau).double().mean()) for k, v in vals.items()},
        "fpr": None, "tpr": {}, "auc": {}, "mlr": {}, "missing": missing, "plots": {},
    }
    if heldout_key in vals:
        out["fpr"] = fpr_interval(cal, vals[heldout_key], p_dyn, n_boot=n_boot, seed=seed, ci=ci).to_dict()
    reference = vals.get(heldout_key, cal)
    curves: dict[str, tuple[Tensor, Tensor, float]] = {}
    for p in positives:
        if p not in vals:
            continue
        op = _operating_point(cal, vals[p], p_dyn)
        out["tpr"][p] = {"tau": op.tau, "fpr_calibration": op.fpr, "tpr": op.tpr}
        out["auc"][p] = {}
        for n in negatives_for_auc:
            if n not in vals or n == p:
                continue
            area = auc(vals[n], vals[p])
            out["auc"][p][n] = area
            fpr, tpr, _ = roc_curve(vals[n], vals[p])
            curves[f"{p} vs {n}"] = (fpr, tpr, area)
        out["mlr"][p] = likelihood_ratio_check(reference, vals[p], bins=mlr_bins).to_dict()
    if out_dir is not None:
        d = Path(out_dir)
        out["plots"]["rho_hist"] = str(rho_histogram_plot(vals, tau, d / "rho_hist.png",
                                                          title=f"rho per set, tau = p{p_dyn:g} of {calibration_key}"))
        if curves:
            out["plots"]["roc"] = str(roc_plot(curves, alpha, d / "roc.png"))
    return out
