"""The command line and the demo, end to end on the micro world."""

import json

import pytest
import yaml
from conftest import MICRO_WORLD

from dsg_tl.cli import main


@pytest.fixture(scope="module")
def micro_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    cfg = {
        "world": MICRO_WORLD,
        "dsg": {"n_features": 4, "p_ratio": 80.0, "c": 5.0, "chunk_len": 16},
        "eval": {"batch_size": 32},
        "sweep": {"c": [2.0, 5.0], "n_features": [2, 4]},
    }
    path = d / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["world", "build", "--help"], ["world", "eval", "--help"], ["select", "--help"],
                 ["calibrate", "--help"], ["evaluate", "--help"], ["demo", "--help"], ["doctor", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: dsg-tl" in capsys.readouterr().out


def test_bad_config_gives_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dsg:\n  n_features: -1\n")
    assert main(["world", "build", "--config", str(bad), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "dsg.n_features" in err
    assert not (tmp_path / "c").exists()  # nothing built, nothing partial


def test_world_build_and_eval(micro_config, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert main(["world", "build", "--config", str(micro_config), "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "FVE" in out and "world at" in out
    assert main(["world", "eval", "--config", str(micro_config), "--cache", cache, "--out", str(tmp_path / "e.json")]) == 0
    table = capsys.readouterr().out
    for domain in ("hazard", "geography", "adjacent"):
        assert domain in table
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["accuracy"]["hazard"]) == {"train_frames", "heldout_frames"}


def test_select_calibrate_evaluate(micro_config, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert main(["select", "--config", str(micro_config), "--cache", cache, "--out", str(tmp_path / "s")]) == 0
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert len(sel["latents"]) == 4 and sel["formula"] == "fisher"
    assert main(["calibrate", "--config", str(micro_config), "--cache", cache, "--out", str(tmp_path / "c")]) == 0
    gate = json.loads((tmp_path / "c" / "gate.json").read_text())
    assert abs(gate["alpha"] - 0.05) < 1e-9
    assert (tmp_path / "c" / "guardrail" / "guardrail.json").is_file()
    assert main(["evaluate", "--config", str(micro_config), "--cache", cache, "--guardrail",
                 str(tmp_path / "c" / "guardrail"), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert set(ev["train_frames"]) == {"base", "guardrail"}


def test_demo_writes_results_plot_and_wandb_run(micro_config, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--config", str(micro_config), "--cache", str(tmp_path / "cache"), "--out", str(out),
                 "--set", "eval.splits=[train_frames]"]) == 0
    res = json.loads((out / "results.json").read_text())
    for method in ("base", "dsg", "static", "random_control"):
        assert set(res["methods"][method]) == {"forget", "retain", "adjacent"}
    assert {"tau", "alpha", "retain_fpr", "forget_tpr"} <= set(res["gate"])
    assert res["selection"]["formula"] == "fisher" and res["formula_variant"] == "fisher"
    assert len(res["sweep"]) == 4
    assert res["config"]["dsg"]["n_features"] == 4 and "torch" in res["versions"]
    assert (out / "pareto.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_doctor_on_a_local_model_and_sae(tmp_path, capsys):
    import standins

    model_dir = standins.build_llama(tmp_path / "model")
    sae_dir = standins.build_sae(tmp_path / "sae")
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\nhello world again\n")
    assert main(["doctor", "--model", str(model_dir), "--sae", str(sae_dir), "--texts", str(texts), "--c", "5"]) == 0
    out = capsys.readouterr().out
    assert "fve" in out and "ce_increase" in out and "warnings" in out
    wrong = standins.build_sae(tmp_path / "wrong", d_in=32)
    with pytest.raises(ValueError, match="d_in"):
        main(["doctor", "--model", str(model_dir), "--sae", str(wrong), "--texts", str(texts)])
