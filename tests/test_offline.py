"""Offline behaviour: hub names fail fast with HF_HUB_OFFLINE=1, local stand-ins load with the network blocked and
no hub call, and without the flag a hub name really tries the network (so the flag is what keeps us offline)."""

from __future__ import annotations

import socket
import time

import pytest
import standins

from dsg_tl.models import ModelLoadError, ModelSpec, SAESpec, load_model, load_sae


class NetworkBlocked(RuntimeError):
    """Raised by the patched socket functions. Not an OSError, so HTTP clients do not retry with back-off."""


@pytest.fixture
def blocked_network(monkeypatch):
    """Record and refuse every outgoing connection (and DNS look-up) at once."""
    calls: list[str] = []

    def refuse(name):
        def _refuse(*args, **kwargs):
            calls.append(name)
            raise NetworkBlocked(f"network blocked by test ({name})")
        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    return calls


@pytest.fixture
def hub_spy(monkeypatch):
    """Record any call into the hub download/listing functions that transformers and sae-lens use."""
    import huggingface_hub
    import huggingface_hub.file_download as fd
    import transformers.utils.hub as th

    calls: list[str] = []

    def spy(name):
        def _spy(*args, **kwargs):
            calls.append(f"{name}{args[:2]}")
            raise AssertionError(f"hub call {name}{args[:2]} during a local load")
        return _spy

    for mod, attr in [(huggingface_hub, "hf_hub_download"), (fd, "hf_hub_download"), (th, "hf_hub_download"),
                      (huggingface_hub, "snapshot_download"), (th, "snapshot_download"),
                      (huggingface_hub.HfApi, "list_repo_tree"), (huggingface_hub.HfApi, "model_info")]:
        monkeypatch.setattr(mod, attr, spy(attr))
    return calls


def _offline(monkeypatch, on: bool):
    import huggingface_hub.constants as hc

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if on:
            monkeypatch.setenv(key, "1")
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", on)  # read once at import: patch the cached flag too


def test_hub_name_fails_fast_when_offline(monkeypatch, blocked_network):
    import sae_lens  # noqa: F401  (import time is not what is measured)

    _offline(monkeypatch, True)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set") as err:
        load_model(ModelSpec(name="gpt2"))
    assert time.perf_counter() - start < 5
    assert "local directory" in str(err.value)
    assert blocked_network == []  # failed on the flag, not on a network attempt


def test_local_standins_load_with_network_blocked(monkeypatch, tmp_path_factory, blocked_network, hub_spy):
    gpt2_dir = standins.cached("gpt2", tmp_path_factory)
    llama_dir = standins.cached("llama", tmp_path_factory)
    sae_dir = standins.cached("sae", tmp_path_factory)
    _offline(monkeypatch, True)
    model = load_model(ModelSpec(name=str(gpt2_dir)))
    load_model(ModelSpec(name=str(gpt2_dir), hf_model_name="gpt2", processing="default"))
    load_model(ModelSpec(name=str(llama_dir)))
    load_sae(SAESpec(path=str(sae_dir)), model=model)
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert blocked_network == [] and hub_spy == []


def test_hub_name_tries_network_without_offline_flag(monkeypatch, blocked_network):
    import sae_lens  # noqa: F401

    _offline(monkeypatch, False)
    start = time.perf_counter()
    with pytest.raises((NetworkBlocked, ConnectionError, OSError)) as err:
        load_model(ModelSpec(name="gpt2"))
    assert time.perf_counter() - start < 5
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert blocked_network or any(isinstance(x, (NetworkBlocked, ConnectionError)) for x in chain), chain
