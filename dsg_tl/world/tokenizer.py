"""A byte-level BPE tokenizer trained on the world's text, saved as a Hugging Face tokenizer folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, words: Iterable[str] = ()) -> Path:
    """Train BPE on ``texts`` and save it as a tokenizer folder (tokenizer.json + tokenizer_config.json).

    bos, eos and pad are declared and are in the vocabulary (TransformerLens needs all three). Each of ``words``
    becomes one token, with and without a leading space (on top of the ``vocab_size`` BPE tokens).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.add_tokens([AddedToken(p + w, normalized=False) for w in sorted(set(words)) for p in ("", " ")])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD).save_pretrained(
        str(out_dir)
    )
    return out_dir


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (the same code path as any local Hugging Face tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
