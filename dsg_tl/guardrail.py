"""The guardrail: clamp selected SAE latents on gated sequences, at the SAE's hook point.

For each sequence in a batch:
  a_S   = activations of the gate latents S (and of the clamp latents C, usually C = S)
  fire  = content tokens where any gate latent is > 0
  rho   = fraction of gate-counted tokens that fire           (see dsg_tl.gate)
          (or the statistic of the guardrail's gate variant ``gate: GateSpec``: windowed, per_turn, hybrid)
  gated = rho > tau   (mode "dynamic")   |   True   (mode "static": the Farrell et al. baseline)
          (hybrid: rho > tau OR count >= gate.k_min)
  at clamp positions (``active``: where ``fire``; ``all``: every content token) of gated sequences, set every clamp
  latent to -c, decode, and add back the SAE error term; ungated sequences pass through unchanged (h' = h exactly).

Two equivalent implementations:
  reference  a = SAE.encode(h); err = h - SAE.decode(a); h' = SAE.decode(a') + err      (cost ~ SAE width)
  fast       h' = h + sum over clamped (t, j) of (a'_j - a_j) W_dec[j], with a_j computed only for the selected
             latents through the SAE's activation (JumpReLU threshold included)       (cost ~ number of latents)
The fast path is exact for Standard (ReLU) and JumpReLU SAEs without activation normalisation. For TopK SAEs
whether a latent fires depends on all others, so the guardrail falls back to the reference path there.

Intermediates are TransformerLens hook points under ``<block>.dsg`` (e.g. ``blocks.1.dsg.hook_rho``): hook_latents,
hook_fire, hook_rho, hook_gate, hook_clamped. ``run_with_cache`` returns them next to the model's activations.

Generation (``with handle.generation(prompt_batch): ...``). Outside a session every forward pass is gated on its own
tokens, which is wrong with a KV cache (each forward after the first sees only the new tokens). Inside a session the
gate is over the growing sequence: the module keeps per-sequence running counts (firing counted tokens, counted
tokens; shape [batch]), the first forward is the prompt (masks from ``prompt_batch``: padding, BOS and EOS never
count), each later forward adds its new tokens (masks from ``set_step_masks``, default: every new token counts), and
  rho_t = fired_t / counted_t over prompt + generated tokens so far,  gated_t = rho_t > tau (dynamic) | True (static).
Each new token is clamped iff the gate over the sequence so far (including that token) fires; earlier positions
keep the decision of their own step (with a KV cache their keys/values were computed under it; without a cache,
``kv_cache=False``, the module re-applies the recorded per-position decisions to the recomputed prefix), so the
cached and uncached loops compute the same thing. A sequence can become gated, or stop being gated, as it grows.
Sessions support the fraction gate only (the running counts are its sufficient statistic); other gate variants
raise NotImplementedError when a session starts.
``handle.gate_history`` / ``handle.rho_history`` hold one [batch] tensor per forward of the session.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookedRootModule, HookPoint

from dsg_tl.batching import TokenBatch
from dsg_tl.gate import GateSpec, gate_decision, gate_statistic

Mode = Literal["dynamic", "static"]
ClampPositions = Literal["active", "all"]
Path_ = Literal["fast", "reference"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LatentSlice:
    """The parameters of an SAE restricted to some latents: enough to encode them and decode their change."""

    latents: Int[Tensor, " k"]
    W_enc: Float[Tensor, "d_model k"]
    b_enc: Float[Tensor, " k"]
    W_dec: Float[Tensor, "k d_model"]
    b_dec: Float[Tensor, " d_model"]
    threshold: Float[Tensor, " k"] | None  # JumpReLU only
    apply_b_dec_to_input: bool

    @classmethod
    def from_sae(cls, sae, latents: Tensor) -> LatentSlice:
        arch = sae.cfg.architecture()
        if arch not in ("standard", "jumprelu"):
            raise ValueError(f"no fast path for {arch!r} SAEs")
        if getattr(sae.cfg, "normalize_activations", "none") not in ("none", None):
            raise ValueError("no fast path for SAEs with activation normalisation")
        latents = latents.to(sae.W_enc.device)
        return cls(
            latents=latents.clone(),
            W_enc=sae.W_enc[:, latents].detach().clone(),
            b_enc=sae.b_enc[latents].detach().clone(),
            W_dec=sae.W_dec[latents].detach().clone(),
            b_dec=sae.b_dec.detach().clone(),
            threshold=sae.threshold[latents].detach().clone() if arch == "jumprelu" else None,
            apply_b_dec_to_input=bool(getattr(sae.cfg, "apply_b_dec_to_input", True)),
        )

    def encode(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... k"]:
        h = h.to(self.W_enc.dtype)  # a bfloat16 model with a float32 slice (or the reverse) is fine
        x = h - self.b_dec if self.apply_b_dec_to_input else h
        pre = x @ self.W_enc + self.b_enc
        if self.threshold is None:
            return torch.relu(pre)
        return torch.relu(pre) * (pre > self.threshold)

    def tensors(self) -> dict[str, Tensor]:
        out = {"latents": self.latents, "W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec,
               "b_dec": self.b_dec, "apply_b_dec_to_input": torch.tensor([int(self.apply_b_dec_to_input)])}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> LatentSlice:
        return cls(t["latents"], t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"),
                   bool(t["apply_b_dec_to_input"][0]))


@dataclass(frozen=True)
class Guardrail:
    """A value describing one guardrail. ``attach(model)`` puts it on a model for the duration of a ``with``."""

    hook_name: str
    gate_latents: Int[Tensor, " n"]
    tau: float
    c: float
    mode: Mode = "dynamic"
    clamp_positions: ClampPositions = "active"
    clamp_latents: Int[Tensor, " m"] | None = None  # default: the gate latents
    path: Path_ = "fast"
    gate: GateSpec = field(default_factory=GateSpec)  # which statistic the gate thresholds (default: fraction)
    sae: Any = field(default=None, repr=False, compare=False)  # full SAE (reference path / TopK)
    slice: LatentSlice | None = field(default=None, repr=False, compare=False)
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"mode must be 'dynamic' or 'static', got {self.mode!r}")
        if self.clamp_positions not in ("active", "all"):
            raise ValueError(f"clamp_positions must be 'active' or 'all', got {self.clamp_positions!r}")
        if isinstance(self.gate, dict):
            object.__setattr__(self, "gate", GateSpec.from_dict(self.gate))
        if not isinstance(self.gate, GateSpec):
            raise TypeError(f"gate must be a GateSpec, got {type(self.gate).__name__}")
        if self.sae is None and self.slice is None:
            raise ValueError("a Guardrail needs an SAE or a saved latent slice")
        if self.slice is None:
            try:
                object.__setattr__(self, "slice", LatentSlice.from_sae(self.sae, self.union_latents))
            except ValueError:
                object.__setattr__(self, "path", "reference")  # TopK or normalised SAE: exact path only
        if self.slice is not None and not torch.isin(self.union_latents.cpu(), self.slice.latents.cpu()).all():
            raise ValueError("the latent slice lacks some gate/clamp latents (changing latents needs the full SAE)")
        if self.path == "reference" and self.sae is None:
            raise ValueError("the reference path needs the full SAE")

    @property
    def clamp(self) -> Tensor:
        return self.gate_latents if self.clamp_latents is None else self.clamp_latents

    @property
    def union_latents(self) -> Tensor:
        return torch.unique(torch.cat([self.gate_latents, self.clamp]).long())

    @classmethod
    def from_selection(cls, sae, latents: Tensor, tau: float, c: float, **kw) -> Guardrail:
        return cls(hook_name=sae.cfg.metadata.hook_name, gate_latents=latents.long(), tau=float(tau), c=float(c),
                   sae=sae, **kw)

    def with_(self, **changes) -> Guardrail:
        """A copy with some fields changed (the latent slice is re-derived when latents change)."""
        if any(k in changes for k in ("gate_latents", "clamp_latents")) and self.sae is not None:
            changes.setdefault("slice", None)
        return replace(self, **changes)

    # ---------------------------------------------------------------- the computation
    def gate_and_fire(
        self, a_gate: Float[Tensor, "batch pos n"], content: Bool[Tensor, "batch pos"], rho_mask: Bool[Tensor, "batch pos"],
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, " batch"], Bool[Tensor, " batch"]]:
        """(fire, the gate statistic, gated); ``tokens`` are needed by the per_turn gate only."""
        fire, r, _, gated = self.gate_fire_count(a_gate, content, rho_mask, tokens)
        return fire, r, gated

    def gate_fire_count(
        self, a_gate: Float[Tensor, "batch pos n"], content: Bool[Tensor, "batch pos"], rho_mask: Bool[Tensor, "batch pos"],
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, " batch"], Int[Tensor, " batch"], Bool[Tensor, " batch"]]:
        """(fire, statistic, raw count of firing counted tokens, gated)."""
        fire = (a_gate > 0).any(-1) & content
        r, count = gate_statistic(self.gate, fire, rho_mask, tokens)
        return fire, r, count, self.decide(r, count)

    def decide(self, r: Float[Tensor, " batch"], count: Tensor | None = None) -> Bool[Tensor, " batch"]:
        """The gate decision from the statistic: r > tau (hybrid: or count >= k_min) if dynamic; always if static."""
        if self.mode != "dynamic":
            return torch.ones_like(r, dtype=torch.bool)
        if count is None:
            return r > self.tau
        return gate_decision(self.gate, self.tau, r, count)

    def clamp_mask(self, fire: Tensor, content: Tensor, gated: Tensor) -> Bool[Tensor, "batch pos"]:
        where = fire if self.clamp_positions == "active" else content
        return where & gated[:, None]

    # ---------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        """Write guardrail.json + guardrail.safetensors (no pickle), atomically."""
        from safetensors.torch import save_file

        from dsg_tl.utils import atomic_dir, versions

        directory = Path(directory)
        slice_ = self.slice if self.slice is not None else None
        with atomic_dir(directory) as tmp:
            tensors = {"gate_latents": self.gate_latents.long().cpu(), "clamp_latents": self.clamp.long().cpu().clone()}
            if slice_ is not None:
                tensors.update({f"slice.{k}": v.detach().cpu().contiguous() for k, v in slice_.tensors().items()})
            save_file(tensors, str(tmp / "guardrail.safetensors"))
            spec = {"format_version": FORMAT_VERSION, "hook_name": self.hook_name, "tau": self.tau, "c": self.c,
                    "mode": self.mode, "clamp_positions": self.clamp_positions, "path": self.path,
                    "gate": self.gate.to_dict(), "has_slice": slice_ is not None, "meta": self.meta, "versions": versions()}
            (tmp / "guardrail.json").write_text(json.dumps(spec, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | Path, sae=None) -> Guardrail:
        """Load a saved guardrail. Without ``sae`` only the fast path is available (from the saved latent slice)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        spec_path, tensor_path = directory / "guardrail.json", directory / "guardrail.safetensors"
        if not spec_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved guardrail (guardrail.json/.safetensors missing)")
        spec = json.loads(spec_path.read_text())
        if spec.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported guardrail format {spec.get('format_version')}")
        t = load_file(str(tensor_path))
        slice_ = None
        if spec["has_slice"]:
            slice_ = LatentSlice.from_tensors({k[len("slice."):]: v for k, v in t.items() if k.startswith("slice.")})
        clamp = t["clamp_latents"]
        path = spec["path"] if (sae is not None or spec["path"] == "fast") else "fast"
        return cls(hook_name=spec["hook_name"], gate_latents=t["gate_latents"], tau=spec["tau"], c=spec["c"],
                   mode=spec["mode"], clamp_positions=spec["clamp_positions"],
                   clamp_latents=None if torch.equal(clamp, t["gate_latents"]) else clamp,
                   path=path, gate=GateSpec.from_dict(spec.get("gate")), sae=sae, slice=slice_,
                   meta=spec.get("meta", {}))

    # ---------------------------------------------------------------- attach
    @contextmanager
    def attach(self, model) -> Iterator[GuardrailModule]:
        """Attach to a HookedTransformer for the ``with`` block; hooks are removed on exit, also on exceptions."""
        module = GuardrailModule(self)
        module.install(model)
        try:
            yield module
        finally:
            module.uninstall(model)


@dataclass
class GenerationState:
    """Running state of one generation session (see :meth:`GuardrailModule.generation`)."""

    prompt: TokenBatch
    kv_cache: bool
    fired: Int[Tensor, " batch"]  # firing counted tokens so far
    counted: Int[Tensor, " batch"]  # counted (gate-mask) tokens so far
    content: Bool[Tensor, "batch seen"]  # content mask of every position seen so far
    position_gate: Bool[Tensor, "batch seen"]  # the decision each position was clamped under
    step_masks: tuple[Tensor, Tensor] | None = None  # masks for the next forward's new tokens

    @property
    def seen(self) -> int:
        return self.content.shape[1]


class GuardrailModule(HookedRootModule):
    """The guardrail's hook function plus its own hook points; lives at ``<parent of hook>.dsg`` while attached."""

    def __init__(self, guardrail: Guardrail):
        super().__init__()
        self.__dict__["g"] = guardrail  # a plain value; its SAE is not a submodule of the model
        self.hook_latents = HookPoint()
        self.hook_fire = HookPoint()
        self.hook_rho = HookPoint()
        self.hook_gate = HookPoint()
        self.hook_clamped = HookPoint()
        self._batch: TokenBatch | None = None
        self.session: GenerationState | None = None  # set while a generation() session is active
        self._last_session: GenerationState | None = None
        self.last_gate: Tensor | None = None
        self.last_rho: Tensor | None = None  # the gate statistic (rho for the fraction gate)
        self.last_count: Tensor | None = None  # raw count of firing counted tokens (outside sessions)
        self.last_fire: Tensor | None = None  # [batch, pos] firing counted tokens of the last forward
        self.gate_history: list[Tensor] = []  # one [batch] bool tensor per forward of the last session
        self.rho_history: list[Tensor] = []
        # plain attributes (not submodules): the model owns these
        self.__dict__["_hook_point"] = None
        self.__dict__["_parent"] = None
        g = guardrail
        # columns of the encoded activations: the saved slice's latents (fast) or the union (reference)
        cols = (g.slice.latents if g.path == "fast" else g.union_latents).tolist()
        col = {j: i for i, j in enumerate(cols)}
        self._gate_idx = torch.tensor([col[j] for j in g.gate_latents.tolist()], dtype=torch.long)
        self._clamp_idx = torch.tensor([col[j] for j in g.clamp.tolist()], dtype=torch.long)
        # common case (clamp latents = gate latents = every encoded column): use the columns as they are, no gathers
        every = list(range(len(cols)))
        self._gate_all = sorted(self._gate_idx.tolist()) == every
        self._clamp_all = sorted(self._clamp_idx.tolist()) == every
        self._idx_device: dict = {}
        self.setup()

    def _indices(self, device) -> tuple[Tensor, Tensor]:
        """(gate, clamp) column indices on ``device`` (moved once per device)."""
        if device not in self._idx_device:
            self._idx_device[device] = (self._gate_idx.to(device), self._clamp_idx.to(device))
        return self._idx_device[device]

    def _gate_acts(self, a_union: Tensor) -> Tensor:
        return a_union if self._gate_all else a_union[..., self._indices(a_union.device)[0]]

    # masks for the next forward passes
    def set_batch(self, batch: TokenBatch | None) -> None:
        self._batch = batch

    # generation sessions
    @contextmanager
    def generation(self, prompt: TokenBatch, *, kv_cache: bool = True) -> Iterator[GuardrailModule]:
        """Gate over the growing sequence for the forwards inside the ``with`` block (see the module docstring).

        The first forward must be the prompt (``prompt.tokens``' shape; any padding, left padding included, is read
        from its masks). With ``kv_cache=True`` every later forward carries only new tokens (a KV cache holds the
        rest); with ``kv_cache=False`` every later forward is the whole sequence so far, of which the positions past
        those already seen are new. Before a forward, ``set_step_masks`` may say which new tokens count (default:
        all). The state is reset on entry; ``gate_history`` and the counts stay readable after exit.
        """
        if self.session is not None:
            raise RuntimeError("a generation session is already active on this guardrail")
        if self.g.gate.kind != "fraction":
            raise NotImplementedError(
                f"generation sessions support the fraction gate only (running counts); this guardrail's gate is "
                f"{self.g.gate.kind!r}. Gate the prompt with a plain forward, or use gate=GateSpec('fraction')")
        b = prompt.tokens.shape[0]
        dev = prompt.tokens.device
        self.session = GenerationState(
            prompt=prompt, kv_cache=kv_cache,
            fired=torch.zeros(b, dtype=torch.long, device=dev), counted=torch.zeros(b, dtype=torch.long, device=dev),
            content=torch.zeros(b, 0, dtype=torch.bool, device=dev),
            position_gate=torch.zeros(b, 0, dtype=torch.bool, device=dev),
        )
        self.gate_history, self.rho_history = [], []
        self._last_session = self.session
        try:
            yield self
        finally:
            self.session = None

    @property
    def generation_state(self) -> GenerationState | None:
        """The active session's state, else the last session's (counts, masks, per-position decisions)."""
        return self.session if self.session is not None else self._last_session

    def set_step_masks(self, content_mask: Tensor, gate_mask: Tensor | None = None) -> None:
        """Masks [batch, n_new] for the new tokens of the next forward in a session (content; rho, default content).

        E.g. False for a generated EOS/BOS and for tokens fed after a sequence has finished.
        """
        if self.session is None:
            raise RuntimeError("set_step_masks() needs an active generation() session")
        content_mask = content_mask.bool()
        rho_mask = content_mask if gate_mask is None else gate_mask.bool() & content_mask
        self.session.step_masks = (content_mask, rho_mask)

    def _session_step(self, h: Tensor) -> tuple[int, Tensor, Tensor]:
        """Number of new positions in this forward and their (content, rho) masks; consumes the step masks."""
        s = self.session
        b, p = h.shape[:2]
        if s.seen == 0:
            if tuple(s.prompt.tokens.shape) != (b, p):
                raise ValueError(f"the first forward of a generation session must be the prompt "
                                 f"{tuple(s.prompt.tokens.shape)}, got {(b, p)}")
            return p, s.prompt.content_mask.to(h.device), s.prompt.rho_mask.to(h.device)
        if b != s.fired.shape[0]:
            raise ValueError(f"generation session for batch size {s.fired.shape[0]}, forward has {b}")
        n_new = p if s.kv_cache else p - s.seen
        if n_new < 1:
            raise ValueError(f"kv_cache=False session: the forward has {p} positions, {s.seen} already seen; "
                             "each forward must be the whole sequence so far plus new tokens")
        masks, s.step_masks = s.step_masks, None
        if masks is None:
            ones = torch.ones(b, n_new, dtype=torch.bool, device=h.device)
            return n_new, ones, ones
        content, rho_mask = (m.to(h.device) for m in masks)
        if content.shape != (b, n_new):
            raise ValueError(f"set_step_masks() gave masks of shape {tuple(content.shape)} for {(b, n_new)} new tokens")
        return n_new, content, rho_mask

    def _masks(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, p = h.shape[:2]
        if self._batch is None:
            content = torch.ones(b, p, dtype=torch.bool, device=h.device)
            content[:, 0] = False  # BOS
            return content, content
        content, rho_mask = self._batch.content_mask, self._batch.rho_mask
        if content.shape != (b, p):
            raise ValueError(
                f"guardrail masks are for a batch of shape {tuple(content.shape)} but the forward pass has {(b, p)}; "
                "call set_batch() with the batch you run"
            )
        return content.to(h.device), rho_mask.to(h.device)

    def _encode_union(self, h: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Activations of the union latents; for the reference path also the full acts and the error term."""
        g = self.g
        if g.path == "fast":
            return g.slice.encode(h), None, None
        sae = g.sae
        full = sae.encode(h)
        err = h - sae.decode(full)
        return full[..., g.union_latents.to(h.device)], full, err

    def forward(self, h: Float[Tensor, "batch pos d_model"], hook=None) -> Tensor:
        if self.session is not None:
            return self._forward_session(h)
        g = self.g
        content, rho_mask = self._masks(h)
        a_union, full, err = self._encode_union(h)
        a_union = self.hook_latents(a_union)
        tokens = None if self._batch is None else self._batch.tokens.to(h.device)
        fire, r, count, gated = g.gate_fire_count(self._gate_acts(a_union), content, rho_mask, tokens)
        fire = self.hook_fire(fire)
        r = self.hook_rho(r)
        gated = self.hook_gate(gated)
        self.last_gate, self.last_rho = gated.detach(), r.detach()
        self.last_count, self.last_fire = count.detach(), fire.detach()
        where = g.clamp_mask(fire, content, gated)
        return self._clamp(h, a_union, full, err, where, gated[:, None].expand(where.shape))

    def _forward_session(self, h: Tensor) -> Tensor:
        """One forward of a generation session: update the running counts, decide, clamp the new positions."""
        g, s = self.g, self.session
        first = s.seen == 0
        n_new, new_content, new_rho = self._session_step(h)
        a_union, full, err = self._encode_union(h)
        a_union = self.hook_latents(a_union)
        # this forward's positions: only the new ones (KV cache, or the prompt), or the whole sequence so far
        content = new_content if (s.kv_cache or first) else torch.cat([s.content.to(h.device), new_content], 1)
        fire = (self._gate_acts(a_union) > 0).any(-1) & content
        fire = self.hook_fire(fire)
        fire_new = fire[:, -n_new:]
        s.fired = s.fired.to(h.device) + (fire_new & new_rho).sum(-1)
        s.counted = s.counted.to(h.device) + new_rho.sum(-1)
        r = s.fired.float() / s.counted.clamp(min=1).float()  # = dsg_tl.gate.rho over all tokens so far
        r = self.hook_rho(r)
        gated = self.hook_gate(g.decide(r))
        new_gate = gated[:, None].expand(-1, n_new)
        past_gate = s.position_gate.to(h.device)
        s.content = torch.cat([s.content.to(h.device), new_content], 1)
        s.position_gate = torch.cat([past_gate, new_gate], 1)
        # the decision for each position of this forward: the new one for new tokens, the recorded one before
        position_gate = new_gate if (s.kv_cache or first) else s.position_gate
        self.last_gate, self.last_rho = gated.detach(), r.detach()
        self.gate_history.append(gated.detach().clone())
        self.rho_history.append(r.detach().clone())
        where = (fire if g.clamp_positions == "active" else content) & position_gate
        return self._clamp(h, a_union, full, err, where, position_gate)

    def _clamp(self, h: Tensor, a_union: Tensor, full: Tensor | None, err: Tensor | None, where: Tensor,
               position_gate: Tensor) -> Tensor:
        """Set the clamp latents to -c at ``where``; positions outside ``position_gate`` stay exactly h.

        Cost ~ number of clamp latents: the clamped activations are materialised for ``hook_clamped`` only when
        something hooks it (``run_with_cache``, a user's hook); otherwise only the change (a' - a) is decoded.
        """
        g = self.g
        hooked = bool(self.hook_clamped._forward_hooks)
        if not hooked and not bool(position_gate.any()):
            return h  # nothing gated and nobody looks at the clamped activations
        cidx = self._indices(h.device)[1]
        a_clamp = a_union if self._clamp_all else a_union[..., cidx]
        new = torch.where(where[..., None], torch.full_like(a_clamp, -g.c), a_clamp)
        if hooked:
            if self._clamp_all:
                clamped = new
            else:
                clamped = a_union.clone()
                clamped[..., cidx] = new
            clamped = self.hook_clamped(clamped)
            new = clamped if self._clamp_all else clamped[..., cidx]
        if not bool(position_gate.any()):
            return h
        if g.path == "fast":
            W_dec = g.slice.W_dec if self._clamp_all else g.slice.W_dec[cidx]
            out = h + ((new - a_clamp).to(W_dec.dtype) @ W_dec).to(h.dtype)
        else:
            full = full.clone()
            full[..., (g.union_latents if self._clamp_all else g.clamp).to(h.device)] = new
            out = g.sae.decode(full) + err
        return torch.where(position_gate[..., None], out, h)

    def install(self, model) -> None:
        hp = model.mod_dict.get(self.g.hook_name) if hasattr(model, "mod_dict") else None
        if not isinstance(hp, HookPoint):
            raise KeyError(
                f"hook point {self.g.hook_name!r} does not exist in this model "
                f"(e.g. {[k for k in model.hook_dict if 'resid' in k][:3]})"
            )
        parent_name = self.g.hook_name.rsplit(".", 1)[0] if "." in self.g.hook_name else ""
        parent = model.get_submodule(parent_name) if parent_name else model
        if hasattr(parent, "dsg"):
            raise RuntimeError(f"a guardrail is already attached at {parent_name or '<model>'}")
        parent.dsg = self
        self.__dict__["_parent"], self.__dict__["_hook_point"] = parent, hp
        self.__dict__["_installed_fn"] = self._hook_fn  # one bound-method object, so removal can find it by identity
        hp.add_hook(self._installed_fn, is_permanent=True)
        model.setup()

    def _hook_fn(self, act: Tensor, hook: HookPoint) -> Tensor:
        return self(act)

    def uninstall(self, model) -> None:
        hp = self._hook_point
        if hp is not None:
            keep = []
            for handle in hp.fwd_hooks:
                if getattr(handle, "user_hook", None) is self.__dict__.get("_installed_fn"):
                    handle.hook.remove()
                else:
                    keep.append(handle)
            hp.fwd_hooks = keep
        if self._parent is not None and getattr(self._parent, "dsg", None) is self:
            del self._parent.dsg
        self.__dict__["_parent"] = self.__dict__["_hook_point"] = None
        self._batch = None
        self.session = None
        model.setup()
