"""dsg_tl.batching.pad_batch: padding side, attention/content/gate masks (hand-written expected tensors)."""

from __future__ import annotations

import pytest
import torch

from dsg_tl.batching import TokenBatch, pad_batch

BOS, EOS, PAD = 0, 1, 2
T, F = True, False
SEQS = [[BOS, 5, 6, EOS], [BOS, 7]]


def test_right_padding():
    b = pad_batch(SEQS, PAD, special_ids=(BOS, EOS), padding_side="right")
    assert b.tokens.tolist() == [[0, 5, 6, 1], [0, 7, 2, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.content_mask.tolist() == [[F, T, T, F], [F, T, F, F]]
    assert b.gate_mask is None
    assert b.rho_mask.tolist() == b.content_mask.tolist()
    assert b.tokens.dtype == torch.long and b.attention_mask.dtype == torch.long
    assert b.content_mask.dtype == torch.bool


def test_left_padding():
    b = pad_batch(SEQS, PAD, special_ids=(BOS, EOS), padding_side="left")
    assert b.tokens.tolist() == [[0, 5, 6, 1], [2, 2, 0, 7]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b.content_mask.tolist() == [[F, T, T, F], [F, F, F, T]]


def test_default_is_right_padding():
    assert pad_batch(SEQS, PAD).tokens.tolist() == [[0, 5, 6, 1], [0, 7, 2, 2]]


def test_without_special_ids_only_padding_is_excluded():
    b = pad_batch(SEQS, PAD)
    assert b.content_mask.tolist() == [[T, T, T, T], [T, T, F, F]]


def test_content_mask_excludes_special_ids_anywhere_and_padding():
    # a pad id that equals a real token (2) is still content where the attention mask is 1
    b = pad_batch([[BOS, 2, EOS, 9, BOS], [BOS]], PAD, special_ids=(BOS, EOS, BOS))
    assert b.tokens.tolist() == [[0, 2, 1, 9, 0], [0, 2, 2, 2, 2]]
    assert b.content_mask.tolist() == [[F, T, F, T, F], [F, F, F, F, F]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_gate_lengths(side):
    seqs = [[BOS, 5, 6, 7, EOS], [BOS, 8, 9]]
    b = pad_batch(seqs, PAD, special_ids=(BOS, EOS), padding_side=side, gate_lengths=[3, 10])
    # the gate counts the first gate_lengths[i] tokens of each sequence, minus BOS/EOS/padding
    if side == "right":
        assert b.gate_mask.tolist() == [[F, T, T, F, F], [F, T, T, F, F]]
        assert b.content_mask.tolist() == [[F, T, T, T, F], [F, T, T, F, F]]
    else:
        assert b.gate_mask.tolist() == [[F, T, T, F, F], [F, F, F, T, T]]
        assert b.content_mask.tolist() == [[F, T, T, T, F], [F, F, F, T, T]]
    assert b.rho_mask is b.gate_mask
    assert b.gate_mask.dtype == torch.bool


def test_gate_length_zero_counts_nothing():
    b = pad_batch([[BOS, 5, 6]], PAD, special_ids=(BOS,), gate_lengths=[0])
    assert b.gate_mask.tolist() == [[F, F, F]]


def test_empty_batch_raises():
    with pytest.raises(ValueError):
        pad_batch([], PAD)


def test_to_keeps_everything():
    b = pad_batch(SEQS, PAD, special_ids=(BOS,), gate_lengths=[2, 2]).to("cpu")
    assert isinstance(b, TokenBatch)
    assert b.tokens.tolist() == [[0, 5, 6, 1], [0, 7, 2, 2]]
    assert b.gate_mask.tolist() == [[F, T, F, F], [F, T, F, F]]
    assert pad_batch(SEQS, PAD).to("cpu").gate_mask is None
