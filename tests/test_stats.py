"""dsg_tl.stats: streaming per-latent moments over content tokens (BOS/EOS/padding excluded), batch invariance."""

from __future__ import annotations

import _tiny
import pytest
import torch

from dsg_tl.stats import LatentStats, accumulate_stats, batches_of, layer_of, sae_input

BOS, EOS, PAD = _tiny.BOS, _tiny.EOS, _tiny.PAD


@pytest.fixture(scope="module")
def model():
    return _tiny.tiny_model(seed=0, tokenizer=True)


@pytest.fixture(scope="module")
def sae():
    return _tiny.standard_sae(seed=1, b_enc=0.05)


@pytest.fixture(scope="module")
def chunks():
    return _tiny.random_seqs(8, seed=5, eos_every=2)


def test_layer_of():
    assert layer_of("blocks.3.hook_resid_post") == 3
    assert layer_of("blocks.0.attn.hook_z") == 0
    assert layer_of("hook_embed") is None
    assert layer_of("blocks.2") is None


# ------------------------------------------------------------------------------------------------- hand-built toy


@pytest.fixture(scope="module")
def toy():
    """hook_embed = W_E[token]; an SAE reading coordinates 0 and 1 of it, so every activation is a literal."""
    model = _tiny.tiny_model(seed=0, tokenizer=True)
    e = torch.eye(_tiny.D_MODEL)
    with torch.no_grad():
        model.W_E[5] = 1.0 * e[0]
        model.W_E[7] = 3.0 * e[0]
        model.W_E[9] = 2.0 * e[1]
        model.W_E[BOS] = 100.0 * (e[0] + e[1])  # would dominate every mean if BOS were counted
        model.W_E[EOS] = 50.0 * e[0]
        model.W_E[PAD] = 70.0 * e[1]
    sae = _tiny.standard_sae(hook="hook_embed", d_sae=4, b_dec_scale=0.0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0  # latent 0 = relu(x0)
        sae.W_enc[1, 1] = 1.0  # latent 1 = relu(x1)
        sae.W_enc[0, 2] = -1.0  # latent 2 = relu(-x0): never fires on these tokens
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))  # latent 3 = 0.5 everywhere
    return model, sae


def test_hand_built_one_chunk(toy):
    model, sae = toy
    st = accumulate_stats(model, sae, [[BOS, 5, 7, 9, EOS]], progress=False)
    # content tokens 5, 7, 9 -> latent 0: 1, 3, 0 | latent 1: 0, 0, 2 | latent 2: 0, 0, 0 | latent 3: .5, .5, .5
    assert st.n_tokens == 3
    assert st.mean.tolist() == pytest.approx([4 / 3, 2 / 3, 0.0, 0.5])
    assert st.mean_sq.tolist() == pytest.approx([10 / 3, 4 / 3, 0.0, 0.25])
    assert st.freq.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 1.0])
    assert st.mean.dtype == torch.float32


@pytest.mark.parametrize("batch_size", [1, 2])
def test_hand_built_two_chunks_with_padding(toy, batch_size):
    model, sae = toy
    st = accumulate_stats(model, sae, [[BOS, 5, 7, 9, EOS], [BOS, 9]], batch_size=batch_size, progress=False)
    # content 5, 7, 9, 9 (BOS, EOS and the 3 pad positions of chunk 2 excluded)
    assert st.n_tokens == 4
    assert st.mean.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.5])
    assert st.mean_sq.tolist() == pytest.approx([2.5, 2.0, 0.0, 0.25])
    assert st.freq.tolist() == pytest.approx([0.5, 0.5, 0.0, 1.0])


def test_no_content_tokens_raises(toy):
    model, sae = toy
    with pytest.raises(ValueError):
        accumulate_stats(model, sae, [[BOS, EOS], [BOS]], progress=False)


# ------------------------------------------------------------------------------------------------- tiny model


def test_equal_across_batch_sizes(model, sae, chunks):
    runs = [accumulate_stats(model, sae, chunks, batch_size=bs, progress=False) for bs in (1, 3, 8)]
    for st in runs[1:]:
        assert st.n_tokens == runs[0].n_tokens
        for name in ("mean", "mean_sq", "freq"):
            torch.testing.assert_close(getattr(st, name), getattr(runs[0], name), atol=1e-6, rtol=0)


def test_matches_direct_computation_over_content_tokens(model, sae, chunks):
    """Each chunk run alone (no padding, plain forward); only tokens that are not BOS/EOS count."""
    acts = []
    for seq in chunks:
        h = _tiny.hook_acts(model, seq)
        keep = torch.tensor([t not in (BOS, EOS) for t in seq])
        with torch.no_grad():
            acts.append(sae.encode(h[keep]).double())
    a = torch.cat(acts)
    n_content = sum(len([t for t in s if t not in (BOS, EOS)]) for s in chunks)
    assert a.shape[0] == n_content
    st = accumulate_stats(model, sae, chunks, batch_size=3, progress=False)
    assert st.n_tokens == n_content
    torch.testing.assert_close(st.mean, a.mean(0).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(st.mean_sq, (a * a).mean(0).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(st.freq, (a > 0).double().mean(0).float(), atol=1e-6, rtol=0)
    assert (st.freq > 0).any() and (st.freq < 1).any()  # the check is not vacuous
    # counting BOS/EOS too would change the result
    with_special = []
    for seq in chunks:
        with torch.no_grad():
            with_special.append(sae.encode(_tiny.hook_acts(model, seq)).double())
    assert not torch.allclose(st.mean, torch.cat(with_special).mean(0).float(), atol=1e-4)


def test_sae_input_stops_early_and_matches_full_run(model, chunks):
    from dsg_tl.batching import pad_batch

    batch = pad_batch(chunks[:3], PAD, special_ids=(BOS, EOS))
    h = sae_input(model, batch, _tiny.HOOK)
    assert h.shape == (3, batch.tokens.shape[1], _tiny.D_MODEL)
    for i, seq in enumerate(chunks[:3]):
        torch.testing.assert_close(h[i, : len(seq)], _tiny.hook_acts(model, seq), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError):
        sae_input(model, batch, "blocks.0.hook_nonexistent")


def test_batches_of_groups_and_pads():
    seqs = [[BOS, 3 + i] + [4] * i for i in range(7)]
    batches = list(batches_of(seqs, 3, PAD, (BOS, EOS)))
    assert [bt.tokens.shape[0] for bt in batches] == [3, 3, 1]
    assert batches[0].tokens.tolist() == [[0, 3, 2, 2], [0, 4, 4, 2], [0, 5, 4, 4]]
    assert batches[2].tokens.tolist() == [[0, 9, 4, 4, 4, 4, 4, 4]]


def test_latent_stats_save_load(tmp_path):
    st = LatentStats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.5]), torch.tensor([0.5, 0.25]), 12345)
    st.save(tmp_path / "s.safetensors")
    back = LatentStats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.mean, st.mean) and torch.equal(back.mean_sq, st.mean_sq)
    assert torch.equal(back.freq, st.freq) and back.n_tokens == 12345
