"""Loading the language model and the SAE, checking that they fit, and a quick "doctor" report on the pair.

``load_model`` accepts a TransformerLens official name (downloaded from the Hugging Face hub or read from its cache)
or a local Hugging Face model directory (``save_pretrained`` layout). Local directories never touch the hub:

* TransformerLens 3.9's ``from_pretrained`` only accepts official names. For a local directory we pass the loaded
  ``hf_model`` and a local tokenizer, and make TransformerLens read the architecture from the directory's own
  ``config.json`` (its ``convert_hf_model_config`` has a local-directory branch that ``from_pretrained`` cannot
  reach; we route the directory to it through a neutral alias, because that branch also matches architectures by
  substrings of the name: a path containing "llama" or "gemma" would pick hard-coded full-size configs).
* Some architectures (Gemma-2, Gemma-3) have no config-driven branch in TransformerLens: their configs exist only by
  official name. For those, set ``hf_model_name`` (e.g. ``"google/gemma-2-2b-it"``). The official name then supplies
  the TransformerLens config, any ``AutoConfig`` lookup of that name is answered from the local directory, and the
  resulting sizes are checked against the local checkpoint.

Set ``HF_HUB_OFFLINE=1`` (``default_offline_env()`` does it for scripts) so that a hub name that is not cached fails
at once instead of retrying for 20-50 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dsg_tl.config import POSITIVE, ConfigError, dataclass, field

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer

OFFLINE_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ModelLoadError(OSError):
    """A model, tokenizer or SAE could not be loaded (missing files, hub unreachable or offline)."""


# --------------------------------------------------------------------------------------------------- environment


def default_offline_env() -> dict[str, str]:
    """Set HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE=1 and WANDB_MODE=offline where unset.

    Variables the user has set (to anything, including "0") are left alone. Returns the variables it set. Call it
    before importing transformers/huggingface_hub: they read the variables at import. If they are already imported,
    their cached offline flags are updated too when HF_HUB_OFFLINE was set here.
    """
    changed = {}
    for key, value in OFFLINE_ENV_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            changed[key] = value
    if "HF_HUB_OFFLINE" in changed:
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True
        ds_config = sys.modules.get("datasets.config")
        if ds_config is not None and "HF_DATASETS_OFFLINE" in changed:
            ds_config.HF_HUB_OFFLINE = True
    return changed


def hub_required(name: str | os.PathLike) -> bool:
    """True iff ``name`` is not an existing local path (so loading it needs the hub or the hub cache)."""
    return not Path(name).expanduser().exists()


def _offline() -> bool:
    mod = sys.modules.get("huggingface_hub.constants")
    if mod is not None:
        return bool(mod.HF_HUB_OFFLINE)
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_error(what: str, name: str, err: BaseException) -> ModelLoadError:
    if _offline():
        hint = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache. Pass a local directory "
                "instead (a save_pretrained folder; set hf_model_name to its TransformerLens official name if "
                "needed), or download it first with the hub reachable.")
    else:
        hint = "the Hugging Face hub could not be reached or refused the request (gated model? no token?)."
    return ModelLoadError(f"cannot load {what} {name!r}: {hint} Cause: {type(err).__name__}: {err}")


# --------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """Which language model to load and how.

    ``name``: a TransformerLens official name ("google/gemma-2-2b-it") or a local Hugging Face model directory.
    ``processing``: "none" = ``from_pretrained_no_processing`` (no LN folding or weight centring; the paper's
    setting, and required for SAEs trained on the raw model); "default" = ``from_pretrained``.
    ``tokenizer``: a local tokenizer folder used instead of the model's.
    ``hf_model_name``: for a local directory, the TransformerLens official name of the architecture it holds; only
    needed where TransformerLens cannot read the architecture from ``config.json`` (Gemma-2/3).
    """

    name: str
    processing: Literal["none", "default"] = "none"
    dtype: str = "float32"
    device: str = "cpu"
    n_devices: int = field(default=1, metadata=POSITIVE)
    tokenizer: str | None = None
    hf_model_name: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("ModelSpec.name must be a model name or a local directory")
        if self.processing not in ("none", "default"):
            raise ConfigError(f"ModelSpec.processing must be 'none' or 'default', got {self.processing!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"ModelSpec.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.n_devices < 1:
            raise ConfigError(f"ModelSpec.n_devices must be >= 1, got {self.n_devices}")

    @property
    def is_local(self) -> bool:
        return not hub_required(self.name)


@dataclass(frozen=True)
class SAESpec:
    """Which SAE to load: a sae-lens release + sae_id (hub), or a local ``save_model`` directory (``path``)."""

    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        has_release = self.release is not None or self.sae_id is not None
        if has_release and self.path is not None:
            raise ConfigError("SAESpec: give either release + sae_id or path, not both")
        if self.path is None and (self.release is None or self.sae_id is None):
            raise ConfigError("SAESpec: give both release and sae_id (a sae-lens release), or path (a local folder)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"SAESpec.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


# --------------------------------------------------------------------------------------------------- model loading


def _load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(
            f"cannot load a tokenizer from local folder {str(folder)!r} with AutoTokenizer "
            f"(it needs tokenizer.json or tokenizer_config.json; save one with tokenizer.save_pretrained): {e}"
        ) from e


@contextlib.contextmanager
def _local_alias(local_dir: Path) -> Iterator[str]:
    """A neutrally named folder holding only ``config.json`` of ``local_dir``, accepted as an official name."""
    import transformer_lens.loading_from_pretrained as loading

    tmp = Path(tempfile.mkdtemp(prefix="dsg_tl_local_"))
    alias = tmp / "model"
    alias.mkdir()
    cfg = json.loads((local_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
        # TL's GPT-2 branch reads hf_config.n_ctx, which transformers 5's GPT2Config no longer defines
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
    (alias / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    original = loading.get_official_model_name
    alias_str = str(alias)

    def official_name(model_name: str) -> str:
        return model_name if model_name == alias_str else original(model_name)

    loading.get_official_model_name = official_name
    try:
        yield alias_str
    finally:
        loading.get_official_model_name = original
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _local_autoconfig(official: str, local_dir: Path) -> Iterator[None]:
    """Answer TransformerLens's ``AutoConfig.from_pretrained(official)`` from the local directory."""
    import transformer_lens.loading_from_pretrained as loading

    original = loading.AutoConfig

    class _LocalAutoConfig:
        def from_pretrained(self, name, *args, **kwargs):
            if name == official:
                kwargs.pop("token", None)
                config = original.from_pretrained(str(local_dir), *args, **kwargs)
                if getattr(config, "model_type", None) == "gpt2" and "n_ctx" not in config.__dict__:
                    config.n_ctx = config.n_positions  # TL's GPT-2 branch reads n_ctx (gone from GPT2Config in v5)
                return config
            return original.from_pretrained(name, *args, **kwargs)

        def __getattr__(self, item):
            return getattr(original, item)

    loading.AutoConfig = _LocalAutoConfig()
    try:
        yield
    finally:
        loading.AutoConfig = original


def _from_pretrained_fn(spec: ModelSpec):
    from sae_lens import HookedSAETransformer

    if spec.processing == "none":
        return HookedSAETransformer.from_pretrained_no_processing
    return HookedSAETransformer.from_pretrained


def _check_local_sizes(cfg, hf_config, name: str) -> None:
    pairs = {
        "d_model": (cfg.d_model, getattr(hf_config, "hidden_size", None)),
        "n_layers": (cfg.n_layers, getattr(hf_config, "num_hidden_layers", None)),
        "n_heads": (cfg.n_heads, getattr(hf_config, "num_attention_heads", None)),
    }
    bad = {k: v for k, v in pairs.items() if v[1] is not None and v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: {a} by name vs {b} in config.json" for k, (a, b) in bad.items())
        raise ValueError(
            f"hf_model_name {name!r} does not describe the local checkpoint ({detail}). TransformerLens takes this "
            f"architecture's sizes from the official name; use the name of the exact model the directory holds, or "
            f"leave hf_model_name unset so the sizes are read from config.json."
        )


def _load_local(spec: ModelSpec, local_dir: Path) -> HookedSAETransformer:
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    if not (local_dir / "config.json").is_file():
        raise ModelLoadError(f"local model directory {str(local_dir)!r} has no config.json (not a save_pretrained "
                             f"folder)")
    tok_dir = Path(spec.tokenizer).expanduser() if spec.tokenizer else local_dir
    if spec.tokenizer and not tok_dir.exists():
        raise ModelLoadError(f"tokenizer folder {spec.tokenizer!r} does not exist")
    tokenizer = _load_tokenizer(tok_dir)
    dtype = DTYPES[spec.dtype]
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(local_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the Hugging Face model in {str(local_dir)!r}: {e}") from e
    load = _from_pretrained_fn(spec)
    kwargs: dict[str, Any] = dict(hf_model=hf_model, tokenizer=tokenizer, device=spec.device,
                                  n_devices=spec.n_devices, dtype=dtype)
    if spec.hf_model_name is None:
        try:
            with _local_alias(local_dir) as alias:
                model = load(alias, **kwargs)
        except NotImplementedError as e:
            raise ValueError(
                f"TransformerLens cannot read the architecture of {str(local_dir)!r} from its config.json ({e}). "
                f"Set ModelSpec.hf_model_name to the TransformerLens official name of the model it holds "
                f"(e.g. 'google/gemma-2-2b-it')."
            ) from e
        model.cfg.model_name = local_dir.name
    else:
        try:
            official = loading.get_official_model_name(spec.hf_model_name)
        except ValueError as e:
            raise ValueError(f"hf_model_name {spec.hf_model_name!r} is not a TransformerLens official model name "
                             f"(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)") from e
        with _local_autoconfig(official, local_dir):
            cfg = loading.get_pretrained_model_config(official, hf_cfg=hf_model.config.to_dict(), device=spec.device,
                                                      n_devices=spec.n_devices, dtype=dtype)
            _check_local_sizes(cfg, hf_model.config, spec.hf_model_name)
            model = load(official, **kwargs)
    model.cfg.tokenizer_name = str(tok_dir)
    return model


def load_model(spec: ModelSpec) -> HookedSAETransformer:
    """Load ``spec`` as a ``HookedSAETransformer`` (a local directory never contacts the hub)."""
    name = Path(spec.name).expanduser()
    if name.exists():
        return _load_local(spec, name)
    if spec.hf_model_name is not None:
        raise ModelLoadError(f"hf_model_name is only for local directories, and {spec.name!r} does not exist")
    load = _from_pretrained_fn(spec)
    kwargs: dict[str, Any] = dict(device=spec.device, n_devices=spec.n_devices, dtype=DTYPES[spec.dtype])
    if spec.tokenizer:
        kwargs["tokenizer"] = _load_tokenizer(Path(spec.tokenizer).expanduser())
    try:
        return load(spec.name, **kwargs)
    except OSError as e:
        raise _hub_error("model", spec.name, e) from e


# --------------------------------------------------------------------------------------------------- SAE loading


def check_sae_fits(model, sae) -> None:
    """Raise ``ValueError`` when the SAE cannot read the model: wrong width or a hook the model lacks.

    (sae-lens only logs a warning and silently skips a wrong hook in ``add_sae``.)
    """
    d_in, d_model = sae.cfg.d_in, model.cfg.d_model
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if d_in != d_model:
        raise ValueError(f"SAE d_in={d_in} does not match the model's d_model={d_model} "
                         f"(SAE hook {hook!r}, model {model.cfg.model_name!r}): wrong SAE for this model")
    if not hook:
        raise ValueError("the SAE has no hook name (sae.cfg.metadata.hook_name is empty); set "
                         "metadata=SAEMetadata(hook_name=...) when building it")
    if hook not in model.hook_dict:
        near = sorted(h for h in model.hook_dict if h.split(".")[-1] == hook.split(".")[-1])[:6]
        raise ValueError(f"the SAE's hook {hook!r} is not a hook of the model ({model.cfg.n_layers} layers); "
                         f"hooks of that kind: {near}")


def load_sae(spec: SAESpec, model=None) -> SAE:
    """Load the SAE (sae-lens release from the hub/cache, or a local folder); check it fits ``model`` if given."""
    from sae_lens import SAE

    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not (path / "cfg.json").is_file():
            raise ModelLoadError(f"SAE folder {spec.path!r} has no cfg.json (write it with sae.save_model)")
        sae = SAE.load_from_disk(str(path), device=spec.device, dtype=spec.dtype)
    else:
        assert spec.release is not None and spec.sae_id is not None
        try:
            sae = SAE.from_pretrained(spec.release, spec.sae_id, device=spec.device, dtype=spec.dtype)
        except OSError as e:
            raise _hub_error("SAE", f"{spec.release}/{spec.sae_id}", e) from e
    if model is not None:
        check_sae_fits(model, sae)
    return sae


# --------------------------------------------------------------------------------------------------- doctor


@dataclasses.dataclass
class DoctorReport:
    """How well the SAE reads the model at its hook, and whether the clamp value suits the residual norms."""

    hook_name: str
    n_texts: int
    n_tokens: int
    fve: float  # fraction of variance explained on content tokens (BOS, EOS, padding excluded)
    mean_l0: float  # mean number of active latents per content token
    ce_clean: float  # next-token CE (nats/token) of the clean model
    ce_spliced: float  # with the SAE reconstruction in place of the activation (no error term)
    ce_increase: float
    median_norm: float  # median L2 norm of the activation at the hook (content tokens)
    clamp_value: float
    clamp_ratio: float  # |c| / median_norm
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mean_ce(logits: torch.Tensor, tokens: torch.Tensor, attn: torch.Tensor) -> tuple[float, int]:
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    mask = attn[:, 1:].bool()
    return float(nll[mask].sum()), int(mask.sum())


@torch.no_grad()
def doctor(model, sae, texts: Sequence[str], c: float, batch_size: int = 4, *,
           splice_bos: bool = False) -> DoctorReport:
    """Run the SAE on the model's activations over ``texts`` and report FVE, L0, CE cost and the clamp ratio.

    The spliced CE replaces the activation at the SAE's hook by ``sae.decode(sae.encode(x))`` at every position
    except BOS (unless ``splice_bos``), matching the guardrail, which never touches BOS.
    """
    from dsg_tl.batching import pad_batch

    check_sae_fits(model, sae)
    if getattr(model, "acts_to_saes", None):
        raise ValueError("doctor() needs the plain model: detach SAEs first (model.reset_saes())")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("doctor() needs at least one non-empty text")
    hook = sae.cfg.metadata.hook_name
    tok = model.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    special = [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]
    max_len = model.cfg.n_ctx
    sae_dtype = sae.W_enc.dtype
    device = sae.W_enc.device

    sum_x = sum_x2 = None
    sse = 0.0
    n_tok = 0
    l0_sum = 0.0
    norms: list[torch.Tensor] = []
    ce_clean = ce_spliced = 0.0
    ce_n = 0
    for b in range(0, len(texts), batch_size):
        seqs = [(bos + tok(t, add_special_tokens=False)["input_ids"])[:max_len] for t in texts[b : b + batch_size]]
        batch = pad_batch(seqs, tok.pad_token_id if tok.pad_token_id is not None else 0, special_ids=special)
        tokens, attn = batch.tokens.to(model.cfg.device), batch.attention_mask.to(model.cfg.device)
        content = batch.content_mask.to(model.cfg.device)
        logits, cache = model.run_with_cache(tokens, attention_mask=attn, names_filter=lambda n: n == hook)
        x = cache[hook][content].to(device=device, dtype=sae_dtype).float()
        acts = sae.encode(x.to(sae_dtype))
        recon = sae.decode(acts).float()
        sse += float(((x - recon) ** 2).double().sum())
        xd = x.double()  # float64 sums: the variance is a difference of large numbers
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sum_x2 = (xd**2).sum(0) if sum_x2 is None else sum_x2 + (xd**2).sum(0)
        n_tok += x.shape[0]
        l0_sum += float((acts != 0).sum())
        norms.append(x.norm(dim=-1).cpu())
        s, n = _mean_ce(logits, tokens, attn)
        ce_clean += s
        ce_n += n

        keep = torch.ones_like(attn, dtype=torch.bool) if splice_bos else ~_is_bos(tokens, bos)

        def splice(act, hook, keep=keep):
            rec = sae.decode(sae.encode(act.to(device=device, dtype=sae_dtype))).to(act.dtype).to(act.device)
            return torch.where(keep[..., None], rec, act)

        logits_s = model.run_with_hooks(tokens, attention_mask=attn, fwd_hooks=[(hook, splice)])
        ce_spliced += _mean_ce(logits_s, tokens, attn)[0]

    if n_tok == 0:
        raise ValueError("doctor(): the texts have no content tokens")
    total_var = float((sum_x2 - sum_x**2 / n_tok).sum())
    fve = 1.0 - sse / total_var if total_var > 0 else float("nan")
    median_norm = float(torch.cat(norms).median())
    ce_c, ce_s = ce_clean / max(ce_n, 1), ce_spliced / max(ce_n, 1)
    ratio = abs(c) / median_norm if median_norm > 0 else float("inf")
    report = DoctorReport(hook_name=hook, n_texts=len(texts), n_tokens=n_tok, fve=fve, mean_l0=l0_sum / n_tok,
                          ce_clean=ce_c, ce_spliced=ce_s, ce_increase=ce_s - ce_c, median_norm=median_norm,
                          clamp_value=float(c), clamp_ratio=ratio)
    if not fve >= 0.7:
        report.warnings.append(f"low fraction of variance explained: {fve:.3f} < 0.7 (wrong SAE, wrong hook, or a "
                               f"model loaded with different processing than the SAE was trained on?)")
    if report.ce_increase > 1.0:
        report.warnings.append(f"splicing the SAE in raises CE by {report.ce_increase:.2f} nats (> 1)")
    if report.mean_l0 == 0:
        report.warnings.append("no latent fires on these texts (mean L0 = 0)")
    if abs(c) < 0.5 * median_norm:
        report.warnings.append(f"the clamp value is small relative to residual norms: |c| = {abs(c):g} < 0.5 x "
                               f"median norm {median_norm:.3g}")
    return report


def _is_bos(tokens: torch.Tensor, bos: list[int]) -> torch.Tensor:
    out = torch.zeros_like(tokens, dtype=torch.bool)
    if bos:
        out[:, 0] = tokens[:, 0] == bos[0]
    return out


__all__ = [
    "ModelSpec", "SAESpec", "ModelLoadError", "DoctorReport", "load_model", "load_sae", "check_sae_fits", "doctor",
    "default_offline_env", "hub_required", "OFFLINE_ENV_DEFAULTS",
]
