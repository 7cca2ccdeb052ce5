"""Tiny random models, SAEs and token sequences shared by the core-module tests (no tokenizer, no network).

Token ids: 0 = BOS, 1 = EOS, 2 = PAD; content tokens are drawn from [3, 50).
"""

from __future__ import annotations

import os
import types

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
from sae_lens import (  # noqa: E402
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; these models are tiny

BOS, EOS, PAD = 0, 1, 2
SPECIAL = (BOS, EOS)
D_MODEL, D_SAE, D_VOCAB = 32, 64, 50
HOOK = "blocks.0.hook_resid_post"


def tiny_cfg(seed: int = 0) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_heads=4, d_head=8, d_mlp=64, d_vocab=D_VOCAB, n_ctx=32,
        act_fn="gelu", normalization_type="LN", device="cpu", seed=seed,
    )


def tiny_model(seed: int = 0, *, tokenizer: bool = False) -> HookedTransformer:
    """A fresh 2-layer HookedTransformer; the same seed gives the same weights.

    ``tokenizer=True`` sets a stand-in with bos/eos/pad ids (what ``dsg_tl.stats`` / ``dsg_tl.calibrate`` read).
    TransformerLens itself reads ``tokenizer.padding_side`` in every forward pass, so the stand-in declares it.
    """
    model = HookedTransformer(tiny_cfg(seed))
    model.eval()
    if tokenizer:
        model.tokenizer = types.SimpleNamespace(
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, padding_side="right"
        )
    return model


def _meta(hook: str) -> SAEMetadata:
    return SAEMetadata(hook_name=hook)


@torch.no_grad()
def standard_sae(seed: int = 0, *, hook: str = HOOK, d_in: int = D_MODEL, d_sae: int = D_SAE,
                 b_enc: float = 0.0, b_dec_scale: float = 0.1) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=_meta(hook)))
    sae.b_enc.fill_(b_enc)
    sae.b_dec.copy_(b_dec_scale * torch.randn(d_in))
    return sae.eval()


@torch.no_grad()
def jumprelu_sae(seed: int = 0, *, hook: str = HOOK, b_enc: float = 0.2) -> JumpReLUSAE:
    """JumpReLU SAE whose thresholds (0.1 .. 0.6) cut off part of the positive pre-activations."""
    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=_meta(hook)))
    sae.b_enc.fill_(b_enc)
    sae.b_dec.copy_(0.1 * torch.randn(D_MODEL))
    sae.threshold.copy_(0.1 + 0.5 * torch.rand(D_SAE))
    return sae.eval()


@torch.no_grad()
def topk_sae(seed: int = 0, *, hook: str = HOOK, k: int = 8) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=k, metadata=_meta(hook)))
    sae.b_dec.copy_(0.1 * torch.randn(D_MODEL))
    return sae.eval()


def random_seqs(n: int, *, seed: int = 0, min_len: int = 3, max_len: int = 14,
                eos_every: int = 3) -> list[list[int]]:
    """``n`` sequences [BOS, content..., (EOS every ``eos_every``-th one)] of varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        body = torch.randint(3, D_VOCAB, (length,), generator=gen).tolist()
        seq = [BOS, *body]
        if eos_every and i % eos_every == eos_every - 1:
            seq.append(EOS)
        out.append(seq)
    return out


@torch.no_grad()
def hook_acts(model, seq: list[int], hook: str = HOOK) -> torch.Tensor:
    """Activations at ``hook`` for one unpadded sequence: [pos, d_model] (plain forward, no masks)."""
    _, cache = model.run_with_cache(torch.tensor([seq]), names_filter=hook)
    return cache[hook][0]
