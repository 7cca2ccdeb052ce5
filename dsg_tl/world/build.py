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
from dsg_tl.utils import atomic_dir, file_sha256, versions, write_json
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
    path: Path

    @property
    def hook_name(self) -> str:
        return self.config.sae.hook_name


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSG_TL_CACHE", ".dsg_cache"))


def world_dir(cfg: WorldConfig, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"world-{config_hash(cfg, GENERATOR_VERSION)}"


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


def _build(cfg: WorldConfig, out: Path) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    world = build_world(cfg.facts)
    train_tokenizer(tokenizer_texts(world), cfg.vocab_size, out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    timings["tokenizer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    docs = [tok(d, add_special_tokens=False)["input_ids"] for d in world.all_texts()]
    rows = pack_documents(docs, cfg.model.n_ctx, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                          cfg.model.seed)
    torch.manual_seed(cfg.model.seed)
    model = _new_model(cfg, tok)
    losses = train_language_model(model, rows, cfg.model, tok.pad_token_id)
    from safetensors.torch import save_file

    (out / "model").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model" / "model.safetensors"))
    timings["model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    acts = collect_activations(model, rows, cfg.sae.hook_name, tok.pad_token_id)
    sae = train_sae(acts, cfg.sae)
    sae.save_model(str(out / "sae"))
    timings["sae_s"] = time.perf_counter() - t0
    quality = sae_quality(model, sae, rows, acts, tok.pad_token_id)
    return {"timings_s": timings, "lm_final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "lm_loss_curve": losses[:: max(1, len(losses) // 100)], "sae": quality,
            "n_train_rows": int(rows.shape[0]), "n_train_tokens": int((rows != tok.pad_token_id).sum())}


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
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


def _load(cfg: WorldConfig, directory: Path) -> WorldArtifacts:
    from sae_lens import SAE
    from safetensors.torch import load_file

    tok = load_tokenizer(directory / "tokenizer")
    model = _new_model(cfg, tok)
    model.load_state_dict(load_file(str(directory / "model" / "model.safetensors")))
    model.eval()
    sae = SAE.load_from_disk(str(directory / "sae"), device="cpu").eval()
    metrics = json.loads((directory / "metrics.json").read_text())
    return WorldArtifacts(cfg, build_world(cfg.facts), model, sae, metrics, directory)


def build_or_load_world(cfg: WorldConfig, cache_dir: str | Path | None = None, *, rebuild: bool = False) -> WorldArtifacts:
    """Load the world for ``cfg`` from the cache, building it (atomically) when absent, corrupted or ``rebuild``."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    directory = world_dir(cfg, cache_dir)
    if directory.exists() and (rebuild or not verify_cache(directory)):
        if not rebuild:
            log.warning("world cache %s is incomplete or corrupted; rebuilding it", directory)
        shutil.rmtree(directory)
    if not directory.exists():
        t0 = time.perf_counter()
        with atomic_dir(directory) as tmp:
            metrics = _build(cfg, tmp)
            metrics["timings_s"]["build_total_s"] = time.perf_counter() - t0
            metrics["versions"] = versions()
            metrics["config_hash"] = config_hash(cfg, GENERATOR_VERSION)
            metrics["generator_version"] = GENERATOR_VERSION
            write_json(tmp / "metrics.json", metrics)
            save_config(cfg, tmp / "config.yaml")
            write_json(tmp / "facts.json", [f.__dict__ for f in build_world(cfg.facts).facts])
            _write_manifest(tmp)
    art = _load(cfg, directory)
    return art


__all__ = ["WorldConfig", "WorldArtifacts", "build_or_load_world", "world_dir", "verify_cache", "to_dict"]
