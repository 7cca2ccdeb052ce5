"""Measure the gate statistic on sequences through the guardrail itself, and calibrate the gate (Neyman-Pearson).

The statistic is the one the guardrail's gate variant thresholds (``Guardrail.gate``: rho for the fraction gate, the
windowed / per-turn fraction, or rho plus the raw count for the hybrid gate); the module's ``hook_rho`` carries it.

Sequences longer than the model's context (``model.cfg.n_ctx``) cannot go through one forward. For those the firing
vector is computed in overlapping windows: the first window is the first n_ctx tokens; each later window is BOS plus
the n_ctx - 1 tokens ending at its last new token, and contributes its last ``n_ctx // 2`` positions, so every token is
seen with at least n_ctx // 2 - 1 tokens of left context (up to the SAE layer only). The statistic is then computed on
the whole firing vector with the same ``dsg_tl.gate`` functions. For sequences that fit, both ways agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from dsg_tl.batching import pad_batch
from dsg_tl.gate import GateReport, GateSpec, calibrate_hybrid, calibrate_tau, gate_report, gate_statistic
from dsg_tl.guardrail import Guardrail
from dsg_tl.stats import layer_of


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """BOS + tokens of each text, truncated to ``max_len`` tokens in all."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_len] for t in texts]


def _special(tok) -> list[int]:
    return [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]


def _stop_layer(model, guardrail: Guardrail) -> int | None:
    layer = layer_of(guardrail.hook_name)
    return layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None


def _windows(n: int, ctx: int) -> list[tuple[int, int, int]]:
    """(start, end, first_new) of each window over positions 1..n-1 of a sequence with BOS at 0 (see module doc)."""
    out = [(0, min(n, ctx), 1)]
    stride = max(1, ctx // 2)
    new = out[0][1]
    while new < n:
        end = min(n, new + stride)
        out.append((end - (ctx - 1), end, new))
        new = end
    return out


@torch.no_grad()
def sequence_gate_stats(
    model, guardrail: Guardrail, seqs: Sequence[Sequence[int]], *, gate_lengths: Sequence[int] | None = None,
    batch_size: int = 32, progress: bool = False, context: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate statistic, raw count of firing counted tokens) of each sequence (BOS first), by the guardrail's own hook.

    ``gate_lengths[i]``: only the first ``gate_lengths[i]`` tokens of sequence i count (None: all). ``context``: the
    longest sequence run in one forward (default ``model.cfg.n_ctx``); longer ones go through windows.
    """
    tok = model.tokenizer
    special = _special(tok)
    probe = guardrail.with_(tau=float("inf"), mode="dynamic")  # never gates: measures only
    stop = _stop_layer(model, guardrail)
    ctx = int(context or getattr(model.cfg, "n_ctx", 10**9))
    stat = torch.empty(len(seqs))
    count = torch.empty(len(seqs), dtype=torch.long)
    short = [i for i in range(len(seqs)) if len(seqs[i]) <= ctx]
    long = [i for i in range(len(seqs)) if len(seqs[i]) > ctx]
    order = sorted(short, key=lambda i: len(seqs[i]))
    with probe.attach(model) as handle:
        for b in tqdm(range(0, len(order), batch_size), desc="gate statistic", disable=not progress):
            idx = order[b : b + batch_size]
            gl = None if gate_lengths is None else [gate_lengths[i] for i in idx]
            batch = pad_batch([seqs[i] for i in idx], tok.pad_token_id, special_ids=special, gate_lengths=gl)
            handle.set_batch(batch)
            model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=stop)
            stat[idx] = handle.last_rho.cpu().float()
            count[idx] = handle.last_count.cpu()
        if long:
            fires = _window_fire(model, handle, [seqs[i] for i in long], ctx, stop, batch_size, progress)
    if long:
        st, c = stats_from_fire(guardrail.gate, [seqs[i] for i in long],
                                [(f, counted_mask(seqs[i], special, None if gate_lengths is None else gate_lengths[i]))
                                 for i, f in zip(long, fires, strict=True)])
        stat[long], count[long] = st, c
    return stat, count


def counted_mask(seq: Sequence[int], special: Sequence[int], gate_length: int | None = None) -> torch.Tensor:
    """The tokens the gate counts in one sequence: not BOS (position 0), not a special token, within gate_length."""
    s = torch.as_tensor(list(seq), dtype=torch.long)
    mask = ~torch.isin(s, torch.tensor(list(special), dtype=torch.long)) if special else torch.ones_like(s).bool()
    mask[:1] = False
    if gate_length is not None:
        mask[gate_length:] = False
    return mask


def stats_from_fire(spec: GateSpec, seqs: Sequence[Sequence[int]],
                    fire_masks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistic, count) of ``spec`` from per-sequence (fire, counted mask) vectors (see :func:`sequence_fire`)."""
    if not seqs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    width = max(len(s) for s in seqs)
    n = len(seqs)
    fire = torch.zeros(n, width, dtype=torch.bool)
    mask = torch.zeros(n, width, dtype=torch.bool)
    tokens = torch.full((n, width), -1, dtype=torch.long)  # -1: padding, never a separator
    for i, (s, (f, m)) in enumerate(zip(seqs, fire_masks, strict=True)):
        fire[i, : len(s)], mask[i, : len(s)] = f, m
        tokens[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return gate_statistic(spec, fire, mask, tokens)


@torch.no_grad()
def sequence_fire(
    model, guardrail: Guardrail, seqs: Sequence[Sequence[int]], *, gate_lengths: Sequence[int] | None = None,
    batch_size: int = 32, progress: bool = False, context: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fire, counted mask) of each sequence: the per-token vectors every gate statistic is a function of.

    Fire = any gate latent > 0 at a content token (the hook's ``hook_fire``); sequences longer than ``context``
    (default ``model.cfg.n_ctx``) go through windows (module doc). :func:`stats_from_fire` gives any variant's
    statistic from them without running the model again.
    """
    tok = model.tokenizer
    special = _special(tok)
    probe = guardrail.with_(tau=float("inf"), mode="dynamic")
    stop = _stop_layer(model, guardrail)
    ctx = int(context or getattr(model.cfg, "n_ctx", 10**9))
    fires: list[torch.Tensor | None] = [None] * len(seqs)
    short = sorted((i for i in range(len(seqs)) if len(seqs[i]) <= ctx), key=lambda i: len(seqs[i]))
    long = [i for i in range(len(seqs)) if len(seqs[i]) > ctx]
    with probe.attach(model) as handle:
        for b in tqdm(range(0, len(short), batch_size), desc="fire", disable=not progress):
            idx = short[b : b + batch_size]
            batch = pad_batch([seqs[i] for i in idx], tok.pad_token_id, special_ids=special)
            handle.set_batch(batch)
            model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=stop)
            f = handle.last_fire.cpu()
            for row, i in enumerate(idx):
                fires[i] = f[row, : len(seqs[i])].clone()
        if long:
            windowed = _window_fire(model, handle, [seqs[i] for i in long], ctx, stop, batch_size, progress)
            for i, f in zip(long, windowed, strict=True):
                fires[i] = f
    return [(fires[i], counted_mask(seqs[i], special, None if gate_lengths is None else gate_lengths[i]))
            for i in range(len(seqs))]


def _window_fire(model, handle, seqs, ctx: int, stop, batch_size: int, progress: bool) -> list[torch.Tensor]:
    """Firing vector (any gate latent > 0; special tokens never fire) of each long sequence, through windows."""
    tok = model.tokenizer
    special = _special(tok)
    bos = list(seqs[0][:1])
    jobs = []  # (sequence index, window tokens, first new position in the sequence, offset of it in the window)
    for k, s in enumerate(seqs):
        for start, end, first_new in _windows(len(s), ctx):
            toks = list(s[start:end]) if start == 0 else bos + list(s[start:end])
            jobs.append((k, toks, first_new, len(toks) - (end - first_new)))
    fires = [torch.zeros(len(s), dtype=torch.bool) for s in seqs]
    unique = list(dict.fromkeys(tuple(j[1]) for j in jobs))  # identical windows (shared prefixes) run once
    computed: dict[tuple, torch.Tensor] = {}
    for b in tqdm(range(0, len(unique), batch_size), desc="gate statistic (windows)", disable=not progress):
        chunk = unique[b : b + batch_size]
        batch = pad_batch(chunk, tok.pad_token_id, special_ids=special)
        handle.set_batch(batch)
        model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=stop)
        fire = handle.last_fire.cpu()
        for row, toks in enumerate(chunk):
            computed[toks] = fire[row, : len(toks)].clone()
    for k, toks, first_new, off in jobs:
        n_new = len(toks) - off
        fires[k][first_new : first_new + n_new] = computed[tuple(toks)][off : off + n_new]
    return fires


def sequence_rho(
    model, guardrail: Guardrail, seqs: Sequence[Sequence[int]], *, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """The gate statistic of each token sequence (rho for the fraction gate), by the guardrail's own hook (forward
    stops after the SAE layer)."""
    return sequence_gate_stats(model, guardrail, seqs, batch_size=batch_size, progress=progress)[0]


def calibrate(
    model,
    guardrail: Guardrail,
    *,
    calibration: Sequence[Sequence[int]],
    heldout: Sequence[Sequence[int]],
    forget: Sequence[Sequence[int]],
    p_dyn: float,
    batch_size: int = 32,
) -> tuple[Guardrail, GateReport, dict[str, torch.Tensor]]:
    """Set the gate's thresholds at level alpha = 1 - p_dyn/100 on ``calibration`` retain sequences; report FPR/TPR.

    fraction / windowed / per_turn: tau = the p_dyn percentile of the statistic. hybrid: (k_min, tau) by
    :func:`dsg_tl.gate.calibrate_hybrid` (the count test gets alpha/2, the fraction test the rest of the budget).
    Returns the calibrated guardrail, the report and the statistic of each set (keys calibration, heldout_retain,
    forget).
    """
    stats = {name: sequence_gate_stats(model, guardrail, seqs, batch_size=batch_size)
             for name, seqs in (("calibration", calibration), ("heldout_retain", heldout), ("forget", forget))}
    return _thresholds(guardrail, guardrail.gate, stats, p_dyn, len(calibration))


def _thresholds(guardrail: Guardrail, spec: GateSpec, stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                p_dyn: float, n_calibration: int) -> tuple[Guardrail, GateReport, dict[str, torch.Tensor]]:
    if spec.kind == "hybrid":
        k_min, tau = calibrate_hybrid(*stats["calibration"], alpha=1 - p_dyn / 100)
        spec = GateSpec(kind="hybrid", window=spec.window, k_min=k_min, separator_ids=spec.separator_ids)
    else:
        tau = calibrate_tau(stats["calibration"][0], p_dyn)
    report = gate_report(tau, p_dyn, n_calibration, stats["heldout_retain"][0], stats["forget"][0], spec=spec,
                         heldout_count=stats["heldout_retain"][1], forget_count=stats["forget"][1])
    return guardrail.with_(tau=tau, gate=spec), report, {k: v[0] for k, v in stats.items()}


def calibrate_variants(
    model, guardrail: Guardrail, specs: dict[str, GateSpec], *, calibration: Sequence[Sequence[int]],
    heldout: Sequence[Sequence[int]], forget: Sequence[Sequence[int]], p_dyn: float, batch_size: int = 32,
) -> dict[str, tuple[Guardrail, GateReport, dict[str, torch.Tensor]]]:
    """:func:`calibrate` for several gate variants of one guardrail (same latents): the firing vectors of the three
    sets are computed once, each variant's statistic from them. {label: (guardrail, report, statistics)}."""
    sets = {"calibration": calibration, "heldout_retain": heldout, "forget": forget}
    fires = {k: sequence_fire(model, guardrail, v, batch_size=batch_size) for k, v in sets.items()}
    out = {}
    for label, spec in specs.items():
        stats = {k: stats_from_fire(spec, sets[k], fires[k]) for k in sets}
        out[label] = _thresholds(guardrail.with_(mode="dynamic"), spec, stats, p_dyn, len(calibration))
    return out
