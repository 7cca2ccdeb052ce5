"""Neyman-Pearson analysis of the gate on the world: rho histograms (paper Fig. 2), ROC/AUC, TPR at alpha, the
held-out false-positive rate with a bootstrap interval, rho vs raw count (paper Fig. 12), and the monotone
likelihood-ratio check.

    python analyses/rho_distribution.py [--config configs/demo.yaml] [--out runs/rho]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsg_tl.analysis.neyman_pearson import gate_analysis, statistic_separation
from dsg_tl.calibrate import encode_texts, sequence_rho
from dsg_tl.cli import analysis_args, world_fit
from dsg_tl.pipeline import sentences
from dsg_tl.utils import write_json


def main() -> None:
    args = analysis_args(__doc__, "runs/rho")
    cfg, art, corpora, fit = world_fit(args)
    tok = art.model.tokenizer
    enc = lambda texts: encode_texts(tok, texts, cfg.dsg.calibration_max_len)  # noqa: E731
    rhos = dict(fit.rhos)
    rhos["adjacent"] = sequence_rho(art.model, fit.guardrail, enc(sentences(list(art.world.documents["adjacent"]))))
    rhos["forget_mcq"] = sequence_rho(art.model, fit.guardrail, enc(
        [it.question for it in art.world.mcq["train_frames"][cfg.forget_domain]]))
    out = Path(args.out)
    report = gate_analysis(rhos, positives=("forget", "forget_mcq"), negatives_for_auc=("heldout_retain", "adjacent"),
                           p_dyn=cfg.dsg.p_dyn, out_dir=out)

    # rho (fraction) vs raw count of firing tokens, forget vs retain (paper Fig. 12)
    def counts(seqs):
        lengths = torch.tensor([max(len(s) - 1, 1) for s in seqs], dtype=torch.float)
        r = sequence_rho(art.model, fit.guardrail, seqs)
        return (r * lengths).round(), lengths

    fc, fl = counts(enc(corpora.forget_eval))
    rc, rl = counts(enc(corpora.heldout_retain))
    report["rho_vs_count"] = statistic_separation(fc, fl, rc, rl)
    write_json(out / "np_analysis.json", report)
    print(json.dumps({k: report[k] for k in ("tau", "alpha", "fpr", "tpr", "auc") if k in report}, indent=2,
                     default=str))
    print(f"rho vs count: {report['rho_vs_count']}")
    print(f"wrote {out / 'np_analysis.json'} and plots in {out}")


if __name__ == "__main__":
    main()
