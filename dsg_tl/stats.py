"""Streaming per-latent statistics over a corpus (one pass, forward only up to the SAE layer).

For every SAE latent j, over all content tokens t (BOS, EOS and padding excluded):
  mean_j    = E_t[a_j(h_t)]
  mean_sq_j = E_t[a_j(h_t)^2]            (the paper's Fisher proxy, Theorem 1)
  freq_j    = P_t[a_j(h_t) > 0]
Sums are accumulated in float64, so results agree across batch sizes up to float32 rounding of the activations.
Memory is O(d_sae), independent of corpus length.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from dsg_tl.batching import TokenBatch, pad_batch


@dataclass(frozen=True)
class LatentStats:
    mean: Float[Tensor, " d_sae"]
    mean_sq: Float[Tensor, " d_sae"]
    freq: Float[Tensor, " d_sae"]
    n_tokens: int

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"mean": self.mean, "mean_sq": self.mean_sq, "freq": self.freq,
                   "n_tokens": torch.tensor([self.n_tokens])}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["mean"], t["mean_sq"], t["freq"], int(t["n_tokens"][0]))


def layer_of(hook_name: str) -> int | None:
    """Block index of a ``blocks.{L}.*`` hook (None for hooks before the first block, e.g. hook_embed)."""
    parts = hook_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 2 else None


@torch.no_grad()
def sae_input(model, batch: TokenBatch, hook_name: str) -> Float[Tensor, "batch pos d_model"]:
    """Activations at ``hook_name``, running the model only up to the block that holds it."""
    layer = layer_of(hook_name)
    stop = None if layer is None else layer + 1
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    _, cache = model.run_with_cache(
        batch.tokens, attention_mask=batch.attention_mask, names_filter=hook_name, stop_at_layer=stop
    )
    if hook_name not in cache:
        raise KeyError(f"hook point {hook_name!r} not found in model (run_with_cache returned {list(cache.keys())})")
    return cache[hook_name]


def batches_of(
    chunks: Iterable[Sequence[int]], batch_size: int, pad_id: int, special_ids: Sequence[int]
) -> Iterator[TokenBatch]:
    buf: list[Sequence[int]] = []
    for chunk in chunks:
        buf.append(chunk)
        if len(buf) == batch_size:
            yield pad_batch(buf, pad_id, special_ids=special_ids)
            buf = []
    if buf:
        yield pad_batch(buf, pad_id, special_ids=special_ids)


@torch.no_grad()
def accumulate_stats(
    model, sae, chunks: Iterable[Sequence[int]], *, batch_size: int = 16, desc: str = "stats",
    total: int | None = None, progress: bool = True,
) -> LatentStats:
    """One streaming pass over token ``chunks`` (each starting with BOS) accumulating per-latent moments."""
    tok = model.tokenizer
    special = [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]
    hook = sae.cfg.metadata.hook_name
    d_sae = sae.cfg.d_sae
    s1 = torch.zeros(d_sae, dtype=torch.float64)
    s2 = torch.zeros(d_sae, dtype=torch.float64)
    nf = torch.zeros(d_sae, dtype=torch.float64)
    n = 0
    device = next(sae.parameters()).device
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="chunk", disable=not progress)
    for batch in batches_of(chunks, batch_size, tok.pad_token_id, special):
        batch = batch.to(device)
        acts = sae.encode(sae_input(model, batch, hook).to(sae.dtype))
        a = acts[batch.content_mask].double()
        s1 += a.sum(0).cpu()
        s2 += (a * a).sum(0).cpu()
        nf += (a > 0).sum(0).cpu()
        n += a.shape[0]
        bar.update(batch.tokens.shape[0])
        bar.set_postfix(tok_s=f"{n / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    if n == 0:
        raise ValueError(f"{desc}: the corpus produced no content tokens")
    return LatentStats((s1 / n).float(), (s2 / n).float(), (nf / n).float(), n)
