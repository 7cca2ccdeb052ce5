"""Measure rho on sequences through the guardrail itself, and calibrate tau (Neyman-Pearson, level alpha)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from dsg_tl.batching import pad_batch
from dsg_tl.gate import GateReport, calibrate_tau, gate_report
from dsg_tl.guardrail import Guardrail
from dsg_tl.stats import layer_of


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """BOS + tokens of each text, truncated to ``max_len`` tokens in all."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_len] for t in texts]


@torch.no_grad()
def sequence_rho(
    model, guardrail: Guardrail, seqs: Sequence[Sequence[int]], *, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """rho of each token sequence, computed by the guardrail's own hook (forward stops after the SAE layer)."""
    tok = model.tokenizer
    special = [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]
    probe = guardrail.with_(tau=float("inf"), mode="dynamic")  # never gates: measures only
    layer = layer_of(guardrail.hook_name)
    stop = layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None
    out = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with probe.attach(model) as handle:
        for b in tqdm(range(0, len(order), batch_size), desc="rho", disable=not progress):
            idx = order[b : b + batch_size]
            batch = pad_batch([seqs[i] for i in idx], tok.pad_token_id, special_ids=special)
            handle.set_batch(batch)
            model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=stop)
            out.append(handle.last_rho.cpu())
    rho = torch.empty(len(seqs))
    rho[torch.tensor(order)] = torch.cat(out)
    return rho


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
    """Set tau to the p_dyn percentile of rho on ``calibration`` retain sequences; report FPR and TPR."""
    rhos = {
        "calibration": sequence_rho(model, guardrail, calibration, batch_size=batch_size),
        "heldout_retain": sequence_rho(model, guardrail, heldout, batch_size=batch_size),
        "forget": sequence_rho(model, guardrail, forget, batch_size=batch_size),
    }
    tau = calibrate_tau(rhos["calibration"], p_dyn)
    report = gate_report(tau, p_dyn, len(calibration), rhos["heldout_retain"], rhos["forget"])
    return guardrail.with_(tau=tau), report, rhos
