"""Greedy generation through a guardrail, with or without a KV cache (also plain greedy, for MUSE VerbMem/KnowMem).

    res = guarded_generate(model, guardrail, ["The toxin of", "Paris is"], max_new_tokens=32)
    res.texts, res.new_tokens, res.gate_history      # continuations, [batch, steps], one [batch] bool per step

Prompts are left-padded (a right-padded :class:`~dsg_tl.batching.TokenBatch` is left-aligned first) and the model
is run token by token: one forward for the prompt, then one per generated token, either with a TransformerLens KV
cache (``use_kv_cache=True``: each forward carries only the new token) or on the whole sequence so far.

The gate (see :meth:`dsg_tl.guardrail.GuardrailModule.generation`) is over the growing sequence: at step t,
rho_t = firing counted tokens / counted tokens over the prompt and the tokens generated so far, and the newest token
is clamped iff rho_t > tau (dynamic; always in static mode); earlier positions keep the decision of their own step.
Both loops compute the same thing. Generated tokens count for rho unless they are BOS/EOS (``special_ids``) or come
after the sequence's EOS. ``gate_history[t]`` is the decision of the forward that produced ``new_tokens[:, t]``.

Each sequence stops at its first EOS (kept in ``new_tokens``; ``pad_token_id`` after it) while the batch runs on
until every sequence has stopped or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dsg_tl.batching import TokenBatch, pad_batch
from dsg_tl.guardrail import Guardrail, GuardrailModule

try:  # TransformerLens >= 3
    from transformer_lens import TransformerLensKeyValueCache as _KVCache
except ImportError:  # pragma: no cover - TransformerLens 2.x
    from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as _KVCache


@dataclass
class GenerationResult:
    tokens: Int[Tensor, "batch width"]  # left-padded prompt + generated tokens (pad after each EOS)
    texts: list[str] | None  # decoded continuations without special tokens (None: no tokenizer that decodes)
    gate_history: list[Bool[Tensor, " batch"]]  # one per step; empty without a guardrail
    rho_history: list[Float[Tensor, " batch"]]
    prompt: TokenBatch  # the left-aligned prompt batch
    lengths: Int[Tensor, " batch"]  # generated tokens per sequence, its EOS included
    new_content: Bool[Tensor, "batch steps"]  # which generated tokens counted as content
    logits: Float[Tensor, "batch steps vocab"] | None = None  # next-token logits of each step (return_logits)

    @property
    def new_tokens(self) -> Int[Tensor, "batch steps"]:
        return self.tokens[:, self.prompt.tokens.shape[1]:]

    @property
    def gated(self) -> Bool[Tensor, "batch steps"] | None:
        """gate_history as one tensor (None without a guardrail)."""
        return torch.stack(self.gate_history, 1) if self.gate_history else None


def left_align(batch: TokenBatch) -> TokenBatch:
    """The same batch with every sequence rolled so that its last attended token is in the last column.

    A right-padded sequence's trailing padding (tokens and masks) moves in front of it: left padding.
    """
    attn = batch.attention_mask.bool()
    width = attn.shape[1]
    idx = torch.arange(width, device=attn.device)
    last = torch.where(attn, idx, torch.full_like(idx, -1)).max(-1).values  # last attended position per row
    shift = (width - 1 - last).clamp(min=0)
    if not bool(shift.any()):
        return batch
    src = (idx[None, :] - shift[:, None]) % width  # out[i, j] = in[i, j - shift_i]: a per-row roll

    def roll(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.gather(1, src)

    return TokenBatch(roll(batch.tokens), roll(batch.attention_mask), roll(batch.content_mask), roll(batch.gate_mask))


def _tokenizer_ids(model) -> tuple[int | None, int | None, int | None]:
    tok = getattr(model, "tokenizer", None)
    return tuple(getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))  # type: ignore[return-value]


def _prompt_batch(model, prompts, pad_id: int, special_ids: Sequence[int]) -> TokenBatch:
    if isinstance(prompts, TokenBatch):
        return left_align(prompts)
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = getattr(model, "tokenizer", None)
    if tok is None or not callable(tok):
        raise ValueError("text prompts need model.tokenizer; pass a TokenBatch instead")
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
    seqs = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return pad_batch(seqs, pad_id, special_ids=special_ids, padding_side="left")


def _decode(model, rows: Tensor, lengths: Tensor) -> list[str] | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None or not callable(getattr(tok, "decode", None)):
        return None
    return [tok.decode(r[: int(n)].tolist(), skip_special_tokens=True) for r, n in zip(rows, lengths)]


@torch.no_grad()
def guarded_generate(
    model,
    guardrail: Guardrail | GuardrailModule | None,
    prompts: Sequence[str] | str | TokenBatch,
    max_new_tokens: int,
    use_kv_cache: bool = True,
    *,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    special_ids: Sequence[int] | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Greedy decoding of ``max_new_tokens`` tokens for a batch of prompts through ``guardrail`` (None: plain).

    ``guardrail`` is a :class:`Guardrail` (attached for the call) or the handle of one already attached to
    ``model``. ``eos_token_id`` (default: the tokenizer's) ends a sequence; ``special_ids`` (default: the
    tokenizer's BOS and EOS, for a TokenBatch also what its content mask leaves out) never count for rho;
    ``pad_token_id`` (default: the tokenizer's pad, else EOS, else 0) fills prompts and finished sequences.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    bos_id, tok_eos, tok_pad = _tokenizer_ids(model)
    if eos_token_id is None:
        eos_token_id = tok_eos
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if stop_at_eos and not eos_ids:
        raise ValueError("stop_at_eos needs an eos_token_id (no tokenizer EOS)")
    pad_id = pad_token_id if pad_token_id is not None else (tok_pad if tok_pad is not None else
                                                            (eos_ids[0] if eos_ids else 0))
    if special_ids is None:
        special_ids = [i for i in (bos_id, *eos_ids) if i is not None]
    device = model.cfg.device
    prompt = _prompt_batch(model, prompts, pad_id, special_ids).to(device)
    b, width = prompt.tokens.shape
    if model.cfg.positional_embedding_type in ("standard", "shortformer"):
        longest = int(prompt.attention_mask.sum(-1).max()) + max_new_tokens - 1
        if longest > model.cfg.n_ctx:
            raise ValueError(f"prompt + {max_new_tokens} new tokens need {longest} positions; n_ctx is {model.cfg.n_ctx}")
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)

    if isinstance(guardrail, Guardrail):
        attached = guardrail.attach(model)
    else:
        attached = contextlib.nullcontext(guardrail)
    tokens = prompt.tokens
    attn = prompt.attention_mask
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    new, new_content, step_logits = [], [], []
    with attached as handle:
        session = handle.generation(prompt, kv_cache=use_kv_cache) if handle is not None else contextlib.nullcontext()
        with session:
            cache = _KVCache.init_cache(model.cfg, device, b) if use_kv_cache else None
            if use_kv_cache:
                logits = model(tokens, attention_mask=attn, past_kv_cache=cache)
            else:
                logits = model(tokens, attention_mask=attn)
            for step in range(max_new_tokens):
                last = logits[:, -1]
                if return_logits:
                    step_logits.append(last.float().clone())
                nxt = last.argmax(-1)
                nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
                content = ~finished & ~torch.isin(nxt, special)
                lengths += (~finished).long()
                if stop_at_eos:
                    finished = finished | torch.isin(nxt, eos)
                new.append(nxt)
                new_content.append(content)
                tokens = torch.cat([tokens, nxt[:, None]], 1)
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                if handle is not None:
                    handle.set_step_masks(content[:, None])
                if use_kv_cache:
                    logits = model(nxt[:, None], attention_mask=attn[:, -1:], past_kv_cache=cache)
                else:
                    logits = model(tokens, attention_mask=attn)
        gate_history = list(handle.gate_history) if handle is not None else []
        rho_history = list(handle.rho_history) if handle is not None else []
    new_tokens = torch.stack(new, 1)
    return GenerationResult(
        tokens=tokens, texts=_decode(model, new_tokens, lengths), gate_history=gate_history,
        rho_history=rho_history, prompt=prompt, lengths=lengths, new_content=torch.stack(new_content, 1),
        logits=torch.stack(step_logits, 1) if return_logits else None,
    )
