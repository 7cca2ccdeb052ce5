"""Model/SAE loading on tiny local stand-ins, the SAE-fit check, the doctor report and the offline helpers."""

from __future__ import annotations

import os

import pytest
import standins
import torch

from dsg_tl.config import ConfigError
from dsg_tl.models import (
    DoctorReport,
    ModelLoadError,
    ModelSpec,
    SAESpec,
    check_sae_fits,
    default_offline_env,
    doctor,
    hub_required,
    load_model,
    load_sae,
)

torch.set_num_threads(2)
TEXTS = ["The cat sat on the mat.", "Proteins fold into shapes in the cell.", "Paris is the capital of France.",
         "Computer security covers networks and passwords.", "The dog ran in the park."]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return standins.cached("gpt2", tmp_path_factory)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return standins.cached("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return standins.cached("sae", tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_model(ModelSpec(name=str(gpt2_dir)))


def _hf_logprobs(model_dir, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return hf(tokens).logits.log_softmax(-1)


# --------------------------------------------------------------------------------------------------- specs / env


def test_specs_validate():
    with pytest.raises(ConfigError, match="processing"):
        ModelSpec(name="gpt2", processing="folded")
    with pytest.raises(ConfigError, match="dtype"):
        ModelSpec(name="gpt2", dtype="fp8")
    with pytest.raises(ConfigError, match="not both"):
        SAESpec(release="r", sae_id="i", path="/x")
    with pytest.raises(ConfigError, match="release and sae_id"):
        SAESpec(release="r")
    with pytest.raises(ConfigError, match="release and sae_id"):
        SAESpec()
    assert SAESpec(path="/x").path == "/x"
    assert ModelSpec(name="gpt2").processing == "none"


def test_hub_required(tmp_path):
    assert hub_required("gpt2")
    assert hub_required("google/gemma-2-2b-it")
    assert not hub_required(str(tmp_path))
    assert ModelSpec(name=str(tmp_path)).is_local


def test_default_offline_env_respects_user(monkeypatch):
    import huggingface_hub.constants as hc

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    changed = default_offline_env()
    assert changed == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    assert os.environ["WANDB_MODE"] == "online" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert hc.HF_HUB_OFFLINE is True
    assert default_offline_env() == {}


# --------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("processing", ["none", "default"])
def test_load_gpt2_standin(gpt2_dir, processing):
    model = load_model(ModelSpec(name=str(gpt2_dir), processing=processing))
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (2, 64, 50257)
    assert model.cfg.tokenizer_name == str(gpt2_dir)
    tokens = model.to_tokens("Hello world")
    assert tokens.tolist() == [[50256, 15496, 995]]  # BOS + the real GPT-2 ids
    with torch.no_grad():
        logp = model(tokens).log_softmax(-1)
    assert logp.shape == (1, 3, 50257)
    # "none" is the raw model; "default" folds LN / centres weights, which leaves log-probs unchanged
    torch.testing.assert_close(logp, _hf_logprobs(gpt2_dir, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("processing", ["none", "default"])
def test_load_llama_standin(llama_dir, processing):
    model = load_model(ModelSpec(name=str(llama_dir), processing=processing))
    assert "llama" in str(llama_dir)  # the path's name must not steer TL to a full-size Llama config
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_key_value_heads) == (2, 64, 2)
    assert model.cfg.original_architecture == "LlamaForCausalLM"
    tokens = model.to_tokens(["the cat sat", "hello"])
    assert (tokens[:, 0] == model.tokenizer.bos_token_id).all() and model.tokenizer.bos_token == "<s>"
    with torch.no_grad():
        logp = model(tokens[:1]).log_softmax(-1)
    torch.testing.assert_close(logp, _hf_logprobs(llama_dir, tokens[:1]), atol=1e-4, rtol=1e-4)


def test_hf_model_name_route(gpt2_dir, llama_dir, tmp_path):
    model = load_model(ModelSpec(name=str(gpt2_dir), hf_model_name="gpt2"))  # AutoConfig("gpt2") answered locally
    assert model.cfg.d_model == 64 and model.cfg.model_name == "gpt2"
    with pytest.raises(ValueError, match="does not describe the local checkpoint"):
        load_model(ModelSpec(name=str(llama_dir), hf_model_name="meta-llama/Llama-3.2-1B"))
    with pytest.raises(ValueError, match="not a TransformerLens official model name"):
        load_model(ModelSpec(name=str(gpt2_dir), hf_model_name="no-such/model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(name=str(tmp_path)))


def test_separate_tokenizer_folder(gpt2_dir, llama_dir):
    model = load_model(ModelSpec(name=str(gpt2_dir), tokenizer=str(gpt2_dir)))
    assert model.tokenizer.bos_token_id == 50256
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSpec(name=str(gpt2_dir), tokenizer=str(llama_dir / "missing")))


# --------------------------------------------------------------------------------------------------- SAEs


def test_load_sae_from_disk(gpt2, sae_dir):
    sae = load_sae(SAESpec(path=str(sae_dir)), model=gpt2)
    assert type(sae).__name__ == "JumpReLUSAE"
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (64, 128, standins.SAE_HOOK)
    with pytest.raises(ModelLoadError, match="cfg.json"):
        load_sae(SAESpec(path=str(sae_dir / "nope")))


def test_check_sae_fits_is_loud(gpt2, tmp_path):
    from sae_lens import SAE

    wrong_width = SAE.load_from_disk(str(standins.build_sae(tmp_path / "w", d_in=32)))
    with pytest.raises(ValueError, match="d_in=32 does not match the model's d_model=64"):
        check_sae_fits(gpt2, wrong_width)
    wrong_hook = standins.build_sae(tmp_path / "h", hook_name="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"'blocks.7.hook_resid_post' is not a hook of the model"):
        load_sae(SAESpec(path=str(wrong_hook)), model=gpt2)
    load_sae(SAESpec(path=str(wrong_hook)))  # without a model there is nothing to check


def test_doctor_random_sae_warns(gpt2, sae_dir):
    sae = load_sae(SAESpec(path=str(sae_dir)), model=gpt2)
    rep = doctor(gpt2, sae, TEXTS, c=0.01, batch_size=2)
    assert isinstance(rep, DoctorReport) and rep.hook_name == standins.SAE_HOOK
    assert rep.n_texts == 5 and rep.n_tokens > 20
    assert rep.mean_l0 > 0  # the small threshold lets latents fire
    assert rep.fve < 0.7 and any("variance explained" in w for w in rep.warnings)
    assert any("clamp value is small relative to residual norms" in w for w in rep.warnings)
    assert rep.clamp_ratio == pytest.approx(0.01 / rep.median_norm)
    assert rep.ce_increase == pytest.approx(rep.ce_spliced - rep.ce_clean)
    d = rep.to_dict()
    assert set(d) >= {"fve", "mean_l0", "ce_clean", "ce_spliced", "ce_increase", "median_norm", "warnings"}


def test_doctor_exact_sae_is_clean(gpt2):
    """An SAE with W_enc = [I, -I], W_dec = [I; -I], threshold 0 reconstructs exactly: FVE 1, no CE cost."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=128, metadata=SAEMetadata(hook_name=standins.SAE_HOOK)))
    eye = torch.eye(64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.zero_()
    rep = doctor(gpt2, sae, TEXTS, c=1e6)
    assert rep.fve == pytest.approx(1.0, abs=1e-5)
    assert abs(rep.ce_increase) < 1e-4
    assert rep.mean_l0 == pytest.approx(64, abs=1)  # one of each +/- pair fires per dimension
    assert rep.warnings == []
