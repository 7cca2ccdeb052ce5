"""Build (or load from cache) the whole fictional-knowledge world: text, tokenizer, tiny model, SAE.

The cache directory is ``<cache_dir>/world-<hash of WorldConfig>``. It is written atomically (built in a temporary
directory, renamed when complete) and carries a manifest with the SHA-256 of every file; a directory whose manifest
is missing or does not match its files is deleted and rebuilt, never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsg_tl.config import config_hash, field, save_config, to_dict
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.utils import atomic_dir, deterministic_torch, file_sha256, versions, write_json
from dsg_tl.world.facts import GENERATOR_VERSION, FactsConfig, World, build_world
from dsg_tl.world.tokenizer import load_tokenizer, train_tokenizer
from dsg_tl.world.train import (
    ModelConfig,
    SAETrainConfig,
    collect_activations,
    hooked_config,
    pack_documents,
    train_language_model,
    train_sae,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@config_dataclass(frozen=True)
class WorldConfig:
    facts: FactsConfig = field(default_factory=FactsConfig)
    vocab_size: int = field(default=1024, metadata={"check": (lambda v: v >= 300, "must be >= 300")})
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)

    def __post_init__(self) -> None:
        if self.sae.layer >= self.model.n_layers:
            raise ValueError(f"sae.layer ({self.sae.layer}) must be < model.n_layers ({self.model.n_layers})")


@dataclass
class WorldArtifacts:
    """A built world: its text, the trained model (with tokenizer) and SAE, and build metrics."""

    config: WorldConfig
    world: World
    model: object  # HookedSAETransformer
    sae: object  # sae_lens SAE
    metrics: dict
    path: Path  # the language-model directory
    sae_path: Path  # the SAE directory inside it

    @property
    def hook_name(self) -> str:
        return self.config.sae.hook_name

    @property
    def model_id(self) -> str:
        """Identifies the (language model, SAE) pair, for cache keys of anything computed from both."""
        return f"{self.path.name}/{self.sae_path.name}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSG_TL_CACHE", ".dsg_cache"))


def tokenizer_texts(world: World) -> list[str]:
    """Training documents plus every MCQ question and choice, so the BPE vocabulary covers them all."""
    extra = [f"{it.question} {c}" for split in world.mcq.values() for items in split.values() for it in items
             for c in it.choices]
    return world.all_texts() + extra


def _new_model(cfg: WorldConfig, tokenizer):
    from sae_lens import HookedSAETransformer

    return HookedSAETransformer(hooked_config(cfg.model, len(tokenizer)), tokenizer=tokenizer)


@torch.no_grad()
def sae_quality(model, sae, rows: torch.Tensor, acts: torch.Tensor, pad_id: int) -> dict:
    """Fraction of variance explained, L0, dead-latent fraction, and the CE-loss increase when spliced in."""
    z = sae.encode(acts)
    recon = sae.decode(z)
    fve = 1 - ((acts - recon) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    hook = sae.cfg.metadata.hook_name
    sample = rows[: min(64, rows.shape[0])]
    mask = (sample[:, 1:] != pad_id).float()

    def ce(logits):
        lp = logits[:, :-1].log_softmax(-1).gather(-1, sample[:, 1:, None])[..., 0]
        return float(-(lp * mask).sum() / mask.sum())

    clean = ce(model(sample))
    spliced = ce(model.run_with_hooks(sample, fwd_hooks=[(hook, lambda x, hook: sae.decode(sae.encode(x)))]))
    return {
        "fve": float(fve),
        "l0": float((z > 0).float().sum(-1).mean()),
        "dead_fraction": float(((z > 0).sum(0) == 0).float().mean()),
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_increase": spliced - clean,
    }


def _rows(world: World, tok, cfg: WorldConfig) -> torch.Tensor:
    docs = [tok(d, add_special_tokens=False)["input_ids"] for d in world.all_texts()]
    return pack_documents(docs, cfg.model.n_ctx, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                          cfg.model.seed)


def _build_lm(cfg: WorldConfig, out: Path) -> dict:
    """Tokenizer + language model into ``out``."""
    from safetensors.torch import save_file

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    world = build_world(cfg.facts)
    names = [f.entity for f in world.facts] if cfg.facts.entity_tokens else []
    train_tokenizer(tokenizer_texts(world), cfg.vocab_size, out / "tokenizer", words=names)
    tok = load_tokenizer(out / "tokenizer")
    timings["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = _rows(world, tok, cfg)
    torch.manual_seed(cfg.model.seed)
    model = _new_model(cfg, tok)
    losses = train_language_model(model, rows, cfg.model, tok.pad_token_id)
    (out / "model").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model" / "model.safetensors"))
    timings["model_s"] = time.perf_counter() - t0
    return {"timings_s": timings, "lm_final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "lm_loss_curve": losses[:: max(1, len(losses) // 100)],
            "n_train_rows": int(rows.shape[0]), "n_train_tokens": int((rows != tok.pad_token_id).sum())}


def _build_sae(cfg: WorldConfig, model, world: World, out: Path) -> dict:
    """The SAE on the language model's activations into ``out``."""
    tok = model.tokenizer
    t0 = time.perf_counter()
    rows = _rows(world, tok, cfg)
    acts = collect_activations(model, rows, cfg.sae.hook_name, tok.pad_token_id)
    sae = train_sae(acts, cfg.sae)
    sae.save_model(str(out))
    quality = sae_quality(model, sae, rows, acts, tok.pad_token_id)
    return {"timings_s": {"sae_s": time.perf_counter() - t0}, "sae": quality}


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                   and not p.relative_to(directory).parts[0].startswith("sae-"))  # SAEs have their own manifest
    manifest = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    write_json(directory / MANIFEST, manifest)


def verify_cache(directory: Path) -> bool:
    """True iff ``directory`` has a manifest and every listed file exists with the recorded size and hash."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not manifest:
        return False
    for rel, info in manifest.items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != info["size"] or file_sha256(p) != info["sha256"]:
            return False
    return True


def lm_key(cfg: WorldConfig) -> str:
    return config_hash(cfg.facts, cfg.vocab_size, cfg.model, GENERATOR_VERSION)


def world_dir(cfg: WorldConfig, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/world-<hash of facts, vocabulary, model>``; its SAEs live in ``sae-<hash of the SAE config>``."""
    return Path(cache_dir or default_cache_dir()) / f"world-{lm_key(cfg)}"


def sae_dir(cfg: WorldConfig, cache_dir: str | Path | None = None) -> Path:
    return world_dir(cfg, cache_dir) / f"sae-{config_hash(cfg.sae)}"


def _ensure(directory: Path, build, rebuild: bool) -> None:
    """Build ``directory`` atomically (with a manifest) unless a verified copy exists."""
    if directory.exists() and (rebuild or not verify_cache(directory)):
        if not rebuild:
            log.warning("cache %s is incomplete or corrupted; rebuilding it", directory)
        shutil.rmtree(directory)
    if directory.exists():
        return
    t0 = time.perf_counter()
    with atomic_dir(directory) as tmp, deterministic_torch():  # a build is reproducible bit for bit
        metrics = build(tmp)
        metrics["timings_s"]["build_total_s"] = time.perf_counter() - t0
        metrics["versions"] = versions()
        write_json(tmp / "metrics.json", metrics)
        _write_manifest(tmp)


def _load_lm(cfg: WorldConfig, directory: Path):
    from safetensors.torch import load_file

    tok = load_tokenizer(directory / "tokenizer")
    model = _new_model(cfg, tok)
    model.load_state_dict(load_file(str(directory / "model" / "model.safetensors")))
    return model.eval()


def build_or_load_world(cfg: WorldConfig, cache_dir: str | Path | None = None, *, rebuild: bool = False) -> WorldArtifacts:
    """Load the world for ``cfg`` from the cache, building what is absent, corrupted or asked to ``rebuild``.

    Two levels: the tokenizer + language model (keyed by facts, vocabulary and model config), and inside it one
    directory per SAE config, so trying another SAE never retrains the language model.
    """
    from sae_lens import SAE

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    lm_path, sae_path = world_dir(cfg, cache_dir), sae_dir(cfg, cache_dir)
    world = build_world(cfg.facts)

    def build_lm(tmp: Path) -> dict:
        m = _build_lm(cfg, tmp)
        m["config_hash"] = lm_key(cfg)
        m["generator_version"] = GENERATOR_VERSION
        save_config(cfg, tmp / "config.yaml")
        write_json(tmp / "facts.json", [f.__dict__ for f in world.facts])
        return m

    _ensure(lm_path, build_lm, rebuild)  # an invalid or rebuilt LM directory takes its SAEs with it
    model = _load_lm(cfg, lm_path)
    _ensure(sae_path, lambda tmp: _build_sae(cfg, model, world, tmp), rebuild=False)
    sae = SAE.load_from_disk(str(sae_path), device="cpu").eval()
    lm_metrics = json.loads((lm_path / "metrics.json").read_text())
    sae_metrics = json.loads((sae_path / "metrics.json").read_text())
    timings = {**lm_metrics["timings_s"], **{k: v for k, v in sae_metrics["timings_s"].items() if k != "build_total_s"}}
    timings["lm_build_total_s"] = lm_metrics["timings_s"].get("build_total_s")
    timings["sae_build_total_s"] = sae_metrics["timings_s"].get("build_total_s")
    metrics = {**lm_metrics, "sae": sae_metrics["sae"], "timings_s": timings}
    return WorldArtifacts(cfg, world, model, sae, metrics, lm_path, sae_path)


__all__ = ["WorldConfig", "WorldArtifacts", "build_or_load_world", "world_dir", "sae_dir", "verify_cache", "to_dict"]
