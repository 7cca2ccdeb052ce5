"""`dsg-tl bench` machinery on a tiny model (timings are reported by the command, never asserted)."""

import torch
from _tiny import HOOK, jumprelu_sae, tiny_model

from dsg_tl.bench import bench_model


def test_bench_model_reports_all_fields_and_gates_about_half():
    model, sae = tiny_model(), jumprelu_sae()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 12), generator=gen)
    tokens[:, 0] = 0
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        freq = (sae.encode(cache[HOOK][:, 1:]) > 0).float().mean((0, 1))
    latents = ((freq > 0.02) & (freq < 0.15)).nonzero().flatten()[:2]  # rarely firing: rho differs by sequence
    assert len(latents) == 2
    r = bench_model(model, sae, latents, tokens, repeats=2, warmup=1, n_layers_full=26)
    for key in ("base_ms", "reference_ms", "fast_ms", "reference_overhead", "fast_overhead",
                "fast_overhead_per_layer_equiv", "reference_overhead_per_layer_equiv"):
        assert key in r and r[key] == r[key]  # present and not NaN
    assert r["base_ms"] > 0 and r["fast_ms"] > 0
    assert abs(r["fast_overhead"] - (r["fast_ms"] / r["base_ms"] - 1)) < 1e-12
    assert 0 < r["gated_fraction"] < 1
    # the benchmark leaves no hooks behind
    assert not model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks
