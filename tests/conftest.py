"""Test setup: offline, CPU, 2 threads; a micro world that builds in seconds, shared by the session."""

import os

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("HF_HUB_DISABLE_TELEMETRY", "1"), ("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

MICRO_WORLD = {
    "facts": {"entities_per_domain": 4, "attributes_per_entity": 3, "docs_per_entity": 6, "mixed_docs_per_domain": 4,
              "background_docs": 20},
    "vocab_size": 400,
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_mlp": 64, "n_ctx": 64, "steps": 30, "batch_size": 8},
    "sae": {"architecture": "standard", "layer": 0, "d_sae": 64, "epochs": 1, "batch_tokens": 256},
}


@pytest.fixture(scope="session")
def micro_world_config():
    from dsg_tl.config import from_dict
    from dsg_tl.world.build import WorldConfig

    return from_dict(WorldConfig, MICRO_WORLD, where="micro world")


@pytest.fixture(scope="session")
def micro_world(micro_world_config, tmp_path_factory):
    from dsg_tl.world.build import build_or_load_world

    return build_or_load_world(micro_world_config, tmp_path_factory.mktemp("cache"))
