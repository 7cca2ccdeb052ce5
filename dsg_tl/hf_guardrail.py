"""Apply a saved guardrail to a plain Hugging Face ``transformers`` causal LM (no TransformerLens at inference).

The guardrail runs as PyTorch hooks on the decoder layer that holds its hook point, with the same computation as
:class:`dsg_tl.guardrail.GuardrailModule` on its fast path (the SAE restricted to the selected latents, the
:class:`~dsg_tl.guardrail.LatentSlice`); the gate and the clamp positions come from
:meth:`Guardrail.gate_and_fire` and :meth:`Guardrail.clamp_mask`.

    g = HFGuardrail.load("runs/x/guardrail")                  # Guardrail.load without the SAE
    with g.attach(hf_model, tokenizer) as handle:
        logits = hf_model(input_ids, attention_mask=attention_mask).logits   # masks derived from the call
        handle.last_gate, handle.last_rho                                   # per sequence, last forward

Masks. By default each forward of the wrapped model derives them from its own ``input_ids`` and ``attention_mask``:
content = attended tokens that are not BOS/EOS (ids from ``tokenizer``, else ``model.config``); rho counts the
content tokens. ``handle.set_batch(...)`` fixes them explicitly (a :class:`~dsg_tl.batching.TokenBatch`, or an
attention mask plus ``input_ids``/``content_mask`` and an optional ``gate_mask``) for the following forwards, until
``set_batch(None)``. ``handle.forward(input_ids, attention_mask, gate_mask=...)`` does both in one call.

Hook names map onto modules as TransformerLens names them for a model loaded without weight processing
(``from_pretrained_no_processing``): ``blocks.L.hook_resid_post`` is the output of decoder layer L (before any final
norm, so for the last layer it is *not* ``hidden_states[-1]`` of GPT-2, which has ``ln_f`` applied), and
``blocks.L.hook_resid_pre`` is the input of decoder layer L. An SAE trained on a TransformerLens model loaded *with*
processing (folded layer norms, centred weights) reads a different basis and must not be used here.

Gate variants (``Guardrail.gate``: fraction, windowed, per_turn, hybrid) use the same ``dsg_tl.gate`` functions as
the TransformerLens path; per_turn needs the token ids (from the call's ``input_ids``, or a TokenBatch / ``input_ids``
given to ``set_batch``) and raises without them.

Not supported: incremental decoding with a KV cache (each step would see only its new tokens, so rho would be
computed over the wrong tokens; such a call raises) and guardrails without a latent slice (TopK SAEs).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dsg_tl.batching import TokenBatch
from dsg_tl.guardrail import Guardrail

HookKind = Literal["output", "input"]

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
# where decoder layers live, by attribute path from the model passed in (causal-LM wrappers and bare base models)
_LAYER_PATHS = (
    "transformer.h",  # GPT-2, GPT-Neo, GPT-J
    "model.layers",  # Llama, Mistral, Gemma, Gemma-2, Qwen2, Phi-3, OLMo
    "model.language_model.layers",  # Gemma-3 (multimodal wrapper)
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "layers",  # base models (LlamaModel, ...)
    "h",  # base GPT2Model
)
_ATTACHED_ATTR = "_dsg_hf_guardrail"


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers; ``ValueError`` for architectures whose layout is not known here."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    arch = getattr(getattr(model, "config", None), "architectures", None) or type(model).__name__
    raise ValueError(
        f"unsupported architecture {arch}: no decoder-layer list found at any of {list(_LAYER_PATHS)} "
        f"(supported: GPT-2-style 'transformer.h', Llama/Gemma/Mistral-style 'model.layers', GPT-NeoX)"
    )


def hf_module_for_hook(model: nn.Module, hook_name: str) -> tuple[nn.Module, HookKind]:
    """The Hugging Face module and hook kind for a TransformerLens hook name.

    ``blocks.L.hook_resid_post`` -> (decoder layer L, "output"): a forward hook on its output hidden states.
    ``blocks.L.hook_resid_pre``  -> (decoder layer L, "input"): a forward pre-hook on its input hidden states.
    """
    m = _HOOK_RE.match(hook_name)
    if m is None:
        raise ValueError(
            f"unsupported hook name {hook_name!r} for a Hugging Face model: only 'blocks.L.hook_resid_post' and "
            f"'blocks.L.hook_resid_pre' map onto decoder-layer boundaries"
        )
    layer, which = int(m.group(1)), m.group(2)
    layers = decoder_layers(model)
    if layer >= len(layers):
        raise ValueError(f"hook {hook_name!r} names layer {layer}, but the model has {len(layers)} decoder layers")
    return layers[layer], ("output" if which == "post" else "input")


def _special_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """BOS and EOS ids (from the tokenizer if given, else from ``model.config``); EOS may be a list."""
    src = tokenizer if tokenizer is not None else getattr(model, "config", None)
    out: set[int] = set()
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(src, name, None)
        if v is None:
            continue
        out.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return sorted(out)


def content_mask_from_ids(input_ids: Tensor, attention_mask: Tensor | None, special_ids: Sequence[int]) -> Tensor:
    """Attended tokens that are not BOS/EOS: the same rule as :func:`dsg_tl.batching.pad_batch`."""
    content = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if len(special_ids):
        content = content & ~torch.isin(input_ids, torch.as_tensor(list(special_ids), device=input_ids.device))
    return content


class HFGuardrailHandle:
    """The live hooks of one attached guardrail: set masks, run, read the last gate decisions."""

    def __init__(self, guardrail: Guardrail, model: nn.Module, special_ids: Sequence[int]):
        g = guardrail
        if g.slice is None:
            raise ValueError("a Hugging Face guardrail needs the fast path (a saved latent slice); this guardrail has "
                             "none (TopK or normalised SAE): use the TransformerLens path with the full SAE")
        self.guardrail = g
        self.model = model
        self.special_ids = list(special_ids)
        latents = g.slice.latents.long().cpu()
        # column of each gate / clamp latent in the slice (the slice may hold more latents than the guardrail uses)
        self._gate_idx = (latents[None, :] == g.gate_latents.long().cpu()[:, None]).long().argmax(1)
        self._clamp_idx = (latents[None, :] == g.clamp.long().cpu()[:, None]).long().argmax(1)
        self._slices: dict[tuple, Any] = {}
        self._explicit: tuple[Tensor, Tensor] | None = None  # (content, rho_mask) from set_batch
        self._auto: tuple[Tensor, Tensor] | None = None  # derived from the current model call
        self._explicit_ids: Tensor | None = None  # token ids for the per_turn gate (from set_batch)
        self._auto_ids: Tensor | None = None  # token ids of the current model call
        self.last_gate: Tensor | None = None
        self.last_rho: Tensor | None = None
        self.last_fire: Tensor | None = None

    # ------------------------------------------------------------------------------------------ masks
    def set_batch(self, batch: TokenBatch | Tensor | None = None, gate_mask: Tensor | None = None, *,
                  input_ids: Tensor | None = None, content_mask: Tensor | None = None) -> None:
        """Fix the masks for the following forwards (``None``: derive them from each call again).

        ``batch``: a :class:`TokenBatch`, or an attention mask [batch, pos]. With an attention mask the content mask
        is ``content_mask`` if given, else the attended tokens of ``input_ids`` minus BOS/EOS, else (no ids) the
        attended tokens minus the first attended one of each row (taken to be BOS). ``gate_mask`` restricts rho.
        """
        if batch is None:
            self._explicit = self._explicit_ids = None
            return
        self._explicit_ids = input_ids
        if isinstance(batch, TokenBatch):
            if gate_mask is not None or input_ids is not None or content_mask is not None:
                raise ValueError("set_batch(TokenBatch) takes no other masks (the batch carries them)")
            content, rho_mask = batch.content_mask, batch.rho_mask
            self._explicit_ids = batch.tokens
        else:
            attn = batch.bool()
            if content_mask is not None:
                content = content_mask.bool() & attn
            elif input_ids is not None:
                content = content_mask_from_ids(input_ids, attn, self.special_ids)
            else:
                first = attn.long().cumsum(-1) == 1
                content = attn & ~(first & attn)
            rho_mask = content if gate_mask is None else gate_mask.bool() & content
        self._explicit = (content.bool(), rho_mask.bool())

    def _masks(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, p = h.shape[:2]
        masks = self._explicit if self._explicit is not None else self._auto
        if masks is None:  # no ids seen (inputs_embeds): like GuardrailModule without a batch
            content = torch.ones(b, p, dtype=torch.bool, device=h.device)
            content[:, 0] = False
            return content, content
        content, rho_mask = masks
        if content.shape != (b, p):
            raise ValueError(
                f"guardrail masks are for a batch of shape {tuple(content.shape)} but the forward pass has {(b, p)}; "
                "call set_batch() with the batch you run (or set_batch(None) to derive masks from each call)"
            )
        return content.to(h.device), rho_mask.to(h.device)

    def _capture_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the wrapped model: derive the masks from this call's input_ids / attention_mask."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        attn = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not isinstance(ids, Tensor):
            self._auto = self._auto_ids = None
            return
        if ids.dim() == 1:
            ids = ids[None]
        past = kwargs.get("past_key_values")
        if (isinstance(attn, Tensor) and attn.shape[-1] != ids.shape[-1]) or (
            past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0
        ):
            raise RuntimeError("the guardrail does not support incremental decoding with a KV cache: the gate needs "
                               "the whole sequence in one forward (run full forwards, e.g. use_cache=False)")
        self._auto = (content_mask_from_ids(ids, attn if isinstance(attn, Tensor) else None, self.special_ids),) * 2
        self._auto_ids = ids

    # ------------------------------------------------------------------------------------------ the computation
    def _slice_for(self, h: Tensor):
        key = (h.device,)
        if key not in self._slices:
            s = self.guardrail.slice
            self._slices[key] = dataclasses.replace(
                s, **{f.name: getattr(s, f.name).to(h.device) for f in dataclasses.fields(s)
                      if isinstance(getattr(s, f.name), Tensor)})
        return self._slices[key]

    def transform(self, h: Tensor) -> Tensor:
        """The guardrail on hidden states [batch, pos, d_model] (GuardrailModule.forward, fast path)."""
        g = self.guardrail
        content, rho_mask = self._masks(h)
        s = self._slice_for(h)
        x = h.to(s.W_enc.dtype)
        a = s.encode(x)
        tokens = None
        if g.gate.kind == "per_turn":
            tokens = self._explicit_ids if self._explicit is not None else self._auto_ids
            if tokens is not None and tuple(tokens.shape) != tuple(content.shape):
                raise ValueError(f"token ids of shape {tuple(tokens.shape)} for a forward of {tuple(content.shape)}")
            tokens = None if tokens is None else tokens.to(h.device)
        fire, r, gated = g.gate_and_fire(a[..., self._gate_idx.to(h.device)], content, rho_mask, tokens)
        self.last_fire, self.last_rho, self.last_gate = fire.detach(), r.detach(), gated.detach()
        if not bool(gated.any()):
            return h
        where = g.clamp_mask(fire, content, gated)
        cidx = self._clamp_idx.to(h.device)
        a_clamp = a[..., cidx]
        new = torch.where(where[..., None], torch.full_like(a_clamp, -g.c), a_clamp)
        out = x + (new - a_clamp) @ s.W_dec[cidx]
        return torch.where(gated[:, None, None], out.to(h.dtype), h)

    def _output_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, Tensor):
            return self.transform(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self.transform(output[0]), *output[1:])
        if isinstance(output, list) and output and isinstance(output[0], Tensor):
            return [self.transform(output[0]), *output[1:]]
        raise TypeError(f"decoder layer returned {type(output).__name__}; expected a tensor or a tuple of tensors")

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args and isinstance(args[0], Tensor):
            return (self.transform(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), Tensor):
            return args, {**kwargs, "hidden_states": self.transform(kwargs["hidden_states"])}
        raise TypeError("cannot find the decoder layer's input hidden states (first argument or 'hidden_states')")

    # ------------------------------------------------------------------------------------------ convenience
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, gate_mask: Tensor | None = None,
                **kwargs) -> Any:
        """``model(input_ids, attention_mask=...)`` with masks from these ids (and ``gate_mask``, if given)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        previous, previous_ids = self._explicit, self._explicit_ids
        self.set_batch(attention_mask, gate_mask, input_ids=input_ids)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._explicit, self._explicit_ids = previous, previous_ids

    __call__ = forward


class HFGuardrail:
    """A :class:`Guardrail` (fast path) applied to a Hugging Face causal LM through forward hooks."""

    def __init__(self, guardrail: Guardrail):
        if guardrail.slice is None:
            raise ValueError("HFGuardrail needs a guardrail with a latent slice (standard or JumpReLU SAE)")
        self.guardrail = guardrail

    @classmethod
    def load(cls, directory: str | Path) -> HFGuardrail:
        """Load a saved guardrail without its SAE (the fast path from the saved latent slice)."""
        return cls(Guardrail.load(directory))

    @property
    def hook_name(self) -> str:
        return self.guardrail.hook_name

    @contextmanager
    def attach(self, model: nn.Module, tokenizer: Any = None) -> Iterator[HFGuardrailHandle]:
        """Hook the guardrail into ``model`` for the ``with`` block; hooks are removed on exit, also on exceptions.

        ``tokenizer`` supplies the BOS/EOS ids excluded from the content mask (default: ``model.config``'s).
        """
        module, kind = hf_module_for_hook(model, self.guardrail.hook_name)
        if getattr(module, _ATTACHED_ATTR, None) is not None:
            raise RuntimeError(f"a guardrail is already attached at {self.guardrail.hook_name!r}")
        handle = HFGuardrailHandle(self.guardrail, model, _special_ids(model, tokenizer))
        removables = []
        try:
            module.__dict__[_ATTACHED_ATTR] = handle
            removables.append(model.register_forward_pre_hook(handle._capture_call, with_kwargs=True))
            if kind == "output":
                removables.append(module.register_forward_hook(handle._output_hook))
            else:
                removables.append(module.register_forward_pre_hook(handle._input_hook, with_kwargs=True))
            yield handle
        finally:
            for r in removables:
                r.remove()
            module.__dict__.pop(_ATTACHED_ATTR, None)
            handle._explicit = handle._auto = handle._explicit_ids = handle._auto_ids = None


def guarded_forward(model: nn.Module, guardrail: Guardrail | HFGuardrail, input_ids: Tensor,
                    attention_mask: Tensor | None = None, *, tokenizer: Any = None, gate_mask: Tensor | None = None,
                    **kwargs) -> Any:
    """One forward of ``model`` with ``guardrail`` attached (content mask = attended tokens minus BOS/EOS)."""
    hf = guardrail if isinstance(guardrail, HFGuardrail) else HFGuardrail(guardrail)
    with hf.attach(model, tokenizer) as handle:
        return handle.forward(input_ids, attention_mask, gate_mask=gate_mask, **kwargs)


__all__ = ["HFGuardrail", "HFGuardrailHandle", "hf_module_for_hook", "decoder_layers", "content_mask_from_ids",
           "guarded_forward"]
