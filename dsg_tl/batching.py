"""Token batches with explicit masks: padding, and which positions count as content.

Every forward pass in dsg_tl goes through a :class:`TokenBatch`, so statistics, the gate and evaluation agree on
which tokens are real. ``content_mask`` marks the tokens that statistics and rho count: real tokens minus BOS, EOS
and padding. ``gate_mask`` (defaults to ``content_mask``) can restrict rho to part of a sequence, e.g. the question of
a cloze-scored MCQ item, so all continuations of one prompt share one gate decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass
class TokenBatch:
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    content_mask: Bool[Tensor, "batch pos"]
    gate_mask: Bool[Tensor, "batch pos"] | None = field(default=None)

    @property
    def rho_mask(self) -> Bool[Tensor, "batch pos"]:
        return self.content_mask if self.gate_mask is None else self.gate_mask

    def to(self, device: str | torch.device) -> TokenBatch:
        return TokenBatch(
            self.tokens.to(device),
            self.attention_mask.to(device),
            self.content_mask.to(device),
            None if self.gate_mask is None else self.gate_mask.to(device),
        )


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    special_ids: Sequence[int] = (),
    padding_side: Literal["left", "right"] = "right",
    gate_lengths: Sequence[int] | None = None,
) -> TokenBatch:
    """Pad token-id lists into a batch.

    ``special_ids`` (BOS, EOS) are excluded from ``content_mask``. ``gate_lengths[i]`` limits sequence i's gate mask
    to its first ``gate_lengths[i]`` tokens (None: the gate counts the whole sequence).
    """
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    gate = None if gate_lengths is None else torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        start = 0 if padding_side == "right" else width - len(s)
        tokens[i, start : start + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        attn[i, start : start + len(s)] = 1
        if gate is not None:
            gate[i, start : start + gate_lengths[i]] = True
    content = attn.bool()
    for sid in set(special_ids):
        content &= tokens != sid
    if gate is not None:
        gate &= content
    return TokenBatch(tokens, attn, content, gate)
