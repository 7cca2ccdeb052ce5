"""Tiny random-weight local stand-ins for the real models and SAEs, saved in their original on-disk formats.

Each builder takes a directory, writes the stand-in there and returns its path. They use no network and take
a second or two. The GPT-2 stand-in uses the real GPT-2 tokenizer files from the shared data folder (skipped when
absent); the Llama stand-in trains a small BPE tokenizer and declares a simple chat template.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")

D_MODEL = 64
SAE_HOOK = "blocks.1.hook_resid_post"

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start|>{{ message['role'] }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

_LLAMA_CORPUS = [
    "The following are multiple choice questions (with answers) about biology.",
    "Which of the following is a virus? A. B. C. D. Answer: (",
    "The cat sat on the mat. The dog ran in the park.",
    "Proteins fold into shapes; enzymes speed up reactions in the cell.",
    "Computer security covers networks, passwords, exploits and malware.",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "user assistant system question answer choice letter",
]


def _shared_data_dir() -> Path:
    override = os.environ.get("DSG_TL_SHARED_DATA")
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer files (vocab.json, merges.txt); skips the calling test when absent."""
    folder = _shared_data_dir() / "tokenizers" / "gpt2"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        pytest.skip(f"GPT-2 tokenizer files not available: {folder}")
    return folder


def build_gpt2(directory: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer, d_model 64 GPT-2 (vocab 50257, random weights) with the real GPT-2 tokenizer, save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=4, vocab_size=50257, n_positions=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_llama_tokenizer(directory: str | Path, *, chat_template: bool = True) -> Path:
    """A small byte-level BPE tokenizer with bos/eos/pad declared (and a simple chat template), save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|start|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_LLAMA_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = LLAMA_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def build_llama(directory: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 kv heads, random weights) with a small BPE tokenizer + chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(directory)
    build_llama_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_sae(directory: str | Path, *, d_in: int = D_MODEL, d_sae: int = 128, hook_name: str = SAE_HOOK,
              seed: int = 0, threshold: float = 0.01) -> Path:
    """A JumpReLU SAE (random weights, small threshold so some latents fire), saved with sae-lens ``save_model``."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        w = torch.randn(d_sae, d_in)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
    sae.save_model(str(out))
    return out


_CACHE: dict[str, Path] = {}


def cached(kind: str, tmp_path_factory) -> Path:
    """Build stand-in ``kind`` ("gpt2", "llama", "sae") once per test session (shared across test modules)."""
    builders = {"gpt2": build_gpt2, "llama": build_llama, "sae": build_sae}
    if kind not in _CACHE:
        _CACHE[kind] = builders[kind](tmp_path_factory.mktemp(f"standin_{kind}") / kind)
    return _CACHE[kind]
