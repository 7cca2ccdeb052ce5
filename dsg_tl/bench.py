"""`dsg-tl bench`: the guardrail's cost. Bare vs reference-guarded vs fast-guarded forward, interleaved, medians.

Settings:
- ``world``: the world's model and SAE.
- ``gemma2_2b_widths``: a random-weight model with Gemma-2-2B widths (d_model 2304, d_mlp 9216, 8 heads of 256) and a
  random JumpReLU SAE with 16,384 latents, with fewer layers than Gemma's 26 on CPU. Its overhead is also reported per
  layer-equivalent: the extra time divided by the time of ``full_depth`` (26) layers, i.e. the overhead the guard would
  add to the full-depth model (``--full-depth`` runs all 26 layers, e.g. on a GPU).
Overhead = guarded / base - 1. The guardrail is dynamic with tau set so that half of the sequences are gated.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dsg_tl.batching import pad_batch
from dsg_tl.guardrail import Guardrail


def _time(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1000


@torch.no_grad()
def bench_model(model, sae, latents: torch.Tensor, tokens: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                c: float = 20.0, n_layers_full: int | None = None, inner: int = 3, settle: bool = True) -> dict:
    """Median ms of bare / reference / fast guarded forwards on ``tokens``: ``repeats`` interleaved round-robin rounds,
    each timing ``inner`` consecutive forwards per setting (after one untimed forward when ``settle``)."""
    device = tokens.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = pad_batch(tokens.tolist(), pad_id=-1, special_ids=[int(tokens[0, 0])])
    batch = batch.to(device)
    base = Guardrail.from_selection(sae, latents, tau=float("inf"), c=c)
    # tau between the rho values of the batch: about half of the sequences are gated
    with base.attach(model) as handle:
        handle.set_batch(batch)
        model(batch.tokens, attention_mask=batch.attention_mask)
        rho = handle.last_rho.cpu()
    uniq = torch.unique(rho)
    mid = len(uniq) // 2
    tau = float((uniq[mid - 1] + uniq[mid]) / 2) if len(uniq) > 1 else float(uniq[0]) - 1.0
    fast = base.with_(tau=tau, path="fast")
    ref = base.with_(tau=tau, path="reference")

    def forward():
        model(batch.tokens, attention_mask=batch.attention_mask)

    def timed(g) -> list[float]:
        """``inner`` forwards, each timed; attaching and detaching the hooks, and one untimed forward right after
        attaching (first-call effects), happen outside the timed region."""
        if g is None:
            if settle:
                forward()
            return [_time(forward, sync) for _ in range(inner)]
        with g.attach(model) as h:
            h.set_batch(batch)
            if settle:
                forward()
            return [_time(forward, sync) for _ in range(inner)]

    runs = {"base": None, "reference": ref, "fast": fast}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(warmup):
        for g in runs.values():
            timed(g)
    for i in range(repeats):  # interleaved round-robin, alternating order
        order = list(runs.items())
        if i % 2:
            order.reverse()
        for name, g in order:
            times[name].extend(timed(g))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"base_ms": med["base"], "reference_ms": med["reference"], "fast_ms": med["fast"],
           "reference_overhead": med["reference"] / med["base"] - 1, "fast_overhead": med["fast"] / med["base"] - 1,
           "batch": list(tokens.shape), "repeats": repeats, "inner": inner, "n_latents": len(latents), "d_sae": sae.cfg.d_sae,
           "n_layers": model.cfg.n_layers, "gated_fraction": float((rho > tau).float().mean())}
    if n_layers_full:
        per_layer = med["base"] / model.cfg.n_layers
        full = per_layer * n_layers_full
        out["layer_equivalent_full_depth"] = n_layers_full
        out["reference_overhead_per_layer_equiv"] = (med["reference"] - med["base"]) / full
        out["fast_overhead_per_layer_equiv"] = (med["fast"] - med["base"]) / full
    return out


def gemma_width_model(n_layers: int, device: str = "cpu", d_vocab: int = 4096, seed: int = 0):
    """Random-weight HookedSAETransformer with Gemma-2-2B widths and a random JumpReLU SAE at blocks.0."""
    from sae_lens import HookedSAETransformer, JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=2304, n_heads=8, d_head=256, d_mlp=9216,
                                  d_vocab=d_vocab, n_ctx=1024, act_fn="gelu", normalization_type="RMS",
                                  device=device, seed=seed)
    model = HookedSAETransformer(cfg).eval()
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=2304, d_sae=16384, device=device,
                                        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.normal_(0, 2304**-0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=-1, keepdim=True))
        sae.threshold.fill_(0.5)
    return model, sae.eval()


def run_bench(world_art, out_dir: str | Path, *, repeats: int = 20, seq_len: int = 128, batch: int = 4,
              gemma_layers: int = 2, full_depth: bool = False, device: str = "cpu", n_latents: int = 20,
              gemma: bool = True, threads: int | None = None) -> dict:
    from dsg_tl.utils import write_json

    if threads is not None:
        torch.set_num_threads(threads)
    results = {}
    gen = torch.Generator().manual_seed(0)
    if world_art is not None:
        model, sae = world_art.model.to(device), world_art.sae.to(device)
        tok = model.tokenizer
        texts = [" ".join(world_art.world.documents[d][i] for i in range(3)) for d in ("hazard", "geography",
                                                                                         "history", "adjacent")]
        seqs = [([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"])[:seq_len] for t in texts]
        width = min(len(s) for s in seqs)
        tokens = torch.tensor([s[:width] for s in seqs][:batch], device=device)
        latents = torch.randperm(sae.cfg.d_sae, generator=gen)[:n_latents]
        results["world"] = bench_model(model, sae, latents, tokens, repeats=repeats, inner=10)
    if gemma:
        layers = 26 if full_depth else gemma_layers
        model, sae = gemma_width_model(layers, device=device)
        tokens = torch.randint(1, model.cfg.d_vocab, (batch, seq_len), generator=gen).to(device)
        tokens[:, 0] = 0
        latents = torch.randperm(sae.cfg.d_sae, generator=gen)[:n_latents]
        results["gemma2_2b_widths"] = bench_model(model, sae, latents, tokens, repeats=repeats, n_layers_full=26,
                                                  inner=1, settle=False)
    for r in results.values():
        r["torch_threads"] = torch.get_num_threads()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", results)
    return results
