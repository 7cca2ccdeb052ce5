"""The paper runner end to end on tiny stand-ins: each YAML in configs/ through run_paper, sizes overridden.

Random weights: accuracies mean nothing, so the tests check structure, ranges and artefacts, not quality.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import standins
import torch
from _data_paths import shared_path

from dsg_tl.config import ConfigError, load_config, override
from dsg_tl.data.types import MCQItem
from dsg_tl.evaluation.mcq import MCQResult
from dsg_tl.guardrail import Guardrail
from dsg_tl.paper import PaperConfig, mcq_summary, mmlu_summary, paper_corpora, run_paper

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MMLU_SUBJECTS = ("high_school_us_history", "college_computer_science", "high_school_geography", "human_aging",
                 "college_biology")
N_Q = 6


def _strict_json(path: Path) -> dict:
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


def _short(records: list[dict], n: int) -> list[dict]:
    return sorted(records, key=lambda r: len(r["question"]) + sum(len(c) for c in r["choices"]))[:n]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these CPU-bound runs (the machine is shared); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return standins.cached("gpt2", tmp_path_factory)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return standins.cached("sae", tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small local corpora and question files in the original formats."""
    bio = json.loads(shared_path("wmdp", "bio_questions.json").read_text(encoding="utf-8"))
    mmlu_src = shared_path("mmlu", "test")
    d = tmp_path_factory.mktemp("paper_data")
    # WMDP questions: the CAIS JSON list, 6 short items
    short = _short(bio, N_Q)
    (d / "bio_questions.json").write_text(json.dumps(short), encoding="utf-8")
    # the same with one question longer than the stand-in's context (256 tokens): dropped and counted
    too_long = [*short[:-1], {**short[-1], "question": " ".join([short[-1]["question"]] * 40)}]
    (d / "questions_one_too_long.json").write_text(json.dumps(too_long), encoding="utf-8")
    # bio-forget: jsonl {"text": ...}; cyber-forget: raw text, one document per line (texts from unused questions)
    docs = [f"{r['question']} {' '.join(r['choices'])}" for r in bio[200:260]]
    (d / "bio_forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    (d / "cyber_forget.txt").write_text("\n".join(docs[30:]) + "\n", encoding="utf-8")
    # MMLU: {test/}{subject}_test.csv with the header, 2 short items per subject; retain text from the rest
    (d / "mmlu" / "test").mkdir(parents=True)
    retain_lines = []
    for subject in MMLU_SUBJECTS:
        with (mmlu_src / f"{subject}_test.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        recs = [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)], "answer": r["answer"]}
                for r in rows]
        with (d / "mmlu" / "test" / f"{subject}_test.csv").open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for r in _short(recs, 2):
                w.writerow([r["question"], *r["choices"], r["answer"]])
        if subject in ("human_aging", "high_school_geography"):
            retain_lines += [f" {r['question']} {r['choices'][int(r['answer'])]}" for r in recs[:25]]
    # WikiText-style raw lines (headings, blank lines, paragraphs); MUSE raw: a JSON list of strings
    wiki = []
    for i in range(0, len(retain_lines), 5):
        wiki += ["", f" = Section {i // 5} = ", "", " ".join(retain_lines[i : i + 5])]
    (d / "wikitext.txt").write_text("\n".join(wiki) + "\n", encoding="utf-8")
    (d / "muse_retain1.json").write_text(json.dumps([" ".join(retain_lines[i : i + 5])
                                                     for i in range(0, len(retain_lines), 5)]), encoding="utf-8")
    return {"dir": d, "muse": shared_path("muse_news")}


def _small(cfg: PaperConfig, gpt2_dir: Path, sae_dir: Path, data: dict, **extra) -> PaperConfig:
    """The same config with the stand-in model/SAE, local data and tiny sizes."""
    d = data["dir"]
    changes = {
        "model.name": str(gpt2_dir), "model.dtype": "float32", "model.device": "cpu",
        "sae.release": None, "sae.sae_id": None, "sae.path": str(sae_dir), "sae.dtype": "float32",
        "sae.device": "cpu", "sae_hook": standins.SAE_HOOK,
        "retain_corpus": str(d / "wikitext.txt"), "retain_corpus_config": None, "retain_corpus_split": None,
        "forget_corpus_config": None, "forget_corpus_split": None,
        "max_forget_docs": 8, "max_questions": N_Q, "batch_size": 8,
        "dsg.chunk_len": 32, "dsg.calibration_max_len": 32, "dsg.n_features": 5, "dsg.c": 3.0,
        "sweep_c": [1.0, 3.0],
    }
    if cfg.task == "muse_news":
        changes |= {"forget_corpus": str(data["muse"] / "raw" / "forget.json"),
                    "retain_corpus": str(d / "muse_retain1.json"), "questions": str(data["muse"]),
                    "muse.knowmem_max_new_tokens": 3, "muse.verbmem_max_new_tokens": 4,
                    "muse.max_prompt_tokens": 48}
    else:
        changes |= {"forget_corpus": str(d / ("bio_forget.jsonl" if cfg.task == "wmdp_bio" else "cyber_forget.txt")),
                    "questions": str(d / "bio_questions.json"), "mmlu": str(d / "mmlu")}
    return override(cfg, changes | extra)


def _in01(x) -> bool:
    return x is None or 0.0 <= x <= 1.0


def _check_common(res: dict, out: Path, cfg: PaperConfig) -> dict:
    assert (out / "config.yaml").is_file() and (out / "results.json").is_file()
    on_disk = _strict_json(out / "results.json")
    for key in ("task", "formula", "formula_text", "corpora", "selection", "gate", "methods", "timings_s", "config",
                "versions", "seeds", "decisions", "model", "sae"):
        assert key in on_disk, key
    assert on_disk["task"] == cfg.task and on_disk["formula"] == "fisher"
    assert {"torch", "transformer-lens", "sae-lens"} <= set(on_disk["versions"])
    assert on_disk["sae"]["hook_name"] == standins.SAE_HOOK
    assert len(on_disk["selection"]["latents"]) == 5
    c = on_disk["corpora"]
    assert c["forget_docs"] <= 8 and c["calibration"] + c["heldout_retain"] == c["retain_chunks"]
    assert c["calibration"] >= 1 and c["heldout_retain"] >= 1 and c["forget_eval"] == c["forget_chunks"] >= 1
    gate = on_disk["gate"]
    assert 0 <= gate["tau"] <= 1 and _in01(gate["retain_fpr"]) and _in01(gate["forget_tpr"])
    assert abs(gate["alpha"] - 0.05) < 1e-9
    # the resolved config reloads, and the guardrail directory loads
    assert load_config(out / "config.yaml", PaperConfig) == override(cfg, {"out_dir": str(out)})
    assert on_disk["config"]["out_dir"] == str(out)
    g = Guardrail.load(out / "guardrail")
    assert g.hook_name == standins.SAE_HOOK and g.tau == pytest.approx(gate["tau"]) and g.c == cfg.dsg.c
    assert g.gate_latents.tolist() == on_disk["selection"]["latents"]
    assert set(on_disk["methods"]) == {"base", *cfg.methods}
    return on_disk


def _check_mcq(block: dict, n_max: int, guarded: bool) -> None:
    assert 0 <= block["n"] <= n_max
    if block["n"] == 0:
        assert block["accuracy"] is None
    else:
        assert 0.0 <= block["accuracy"] <= 1.0
    if guarded:
        assert _in01(block["gate_rate"])


# --------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,n,p_ratio,subject", [("wmdp_bio", 20, 95.0, "college_computer_science"),
                                                     ("wmdp_cyber", 30, 90.0, "college_biology"),
                                                     ("muse_news", 20, 95.0, None)])
def test_yaml_configs_hold_paper_settings(name, n, p_ratio, subject):
    cfg = load_config(CONFIGS / f"{name}_gemma2_2b.yaml", PaperConfig)
    assert cfg.task == name
    assert (cfg.model.name, cfg.model.processing, cfg.model.dtype, cfg.model.device) == (
        "google/gemma-2-2b-it", "none", "bfloat16", "cuda")
    assert (cfg.sae.release, cfg.sae.sae_id) == ("gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_142")
    assert cfg.sae_hook == "blocks.3.hook_resid_post"
    assert (cfg.dsg.n_features, cfg.dsg.p_ratio, cfg.dsg.p_dyn, cfg.dsg.c, cfg.dsg.chunk_len) == (
        n, p_ratio, 95.0, 500.0, 1024)
    assert cfg.max_forget_docs == 1024
    if subject is not None:
        assert (cfg.retain_corpus, cfg.retain_corpus_config, cfg.retain_corpus_split) == (
            "wikitext", "wikitext-2-raw-v1", "test")
        assert subject in cfg.subjects and len(cfg.subjects) == 4 and cfg.correct_subset
    else:
        assert cfg.forget_corpus_split == "forget" and cfg.retain_corpus_split == "retain1"


def test_config_validation():
    cfg = load_config(CONFIGS / "wmdp_bio_gemma2_2b.yaml", PaperConfig)
    with pytest.raises(ConfigError, match="sae.dtype"):
        override(cfg, {"sae.dtype": "float32"})
    with pytest.raises(ConfigError, match="methods"):
        override(cfg, {"methods": ["dsg", "rmu"]})
    with pytest.raises(ConfigError, match="task"):
        override(cfg, {"task": "wmdp_chem"})
    with pytest.raises(ConfigError, match="min_mmlu"):
        override(cfg, {"min_mmlu": 1.5})


def test_empty_sets_report_n0_and_null():
    empty = MCQResult(torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    s = mcq_summary(empty, with_gate=True)
    assert s["n"] == 0 and s["accuracy"] is None and s["gate_rate"] is None
    m = mmlu_summary(empty, [], ["human_aging"], with_gate=True)
    assert m["pooled"] is None and m["per_subject"]["human_aging"] == {"n": 0, "n_correct": 0, "accuracy": None}
    json.dumps([s, m], allow_nan=False)  # valid JSON: no NaN
    item = MCQItem("q?", ("a", "b", "c", "d"), 1, subject="human_aging")
    res = MCQResult(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([1]), torch.tensor([True]))
    m = mmlu_summary(res, [item], ["human_aging", "college_biology"], with_gate=True)
    assert m["pooled"] == 1.0 and m["per_subject"]["college_biology"]["accuracy"] is None and m["gate_rate"] == 1.0


def test_paper_corpora_balances_chunks(gpt2_dir, data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gpt2_dir))
    forget = [line for line in (data["dir"] / "cyber_forget.txt").read_text().splitlines() if line.strip()]
    retain = [line for line in (data["dir"] / "wikitext.txt").read_text().splitlines() if line.strip()]
    unbalanced, c0 = paper_corpora(tok, forget, retain, 32, balance_chunks=False)
    balanced, c1 = paper_corpora(tok, forget, retain, 32, balance_chunks=True)
    assert c0["forget_chunks"] != c0["retain_chunks"]
    # the larger side is cut to the smaller side's chunk count (re-tokenising the cut may move it by one)
    small = min(c0["forget_chunks"], c0["retain_chunks"])
    assert abs(c1["forget_chunks"] - small) <= 1 and abs(c1["retain_chunks"] - small) <= 1
    assert c1["forget_docs"] <= c0["forget_docs"] and c1["retain_docs"] <= c0["retain_docs"]
    assert c1["calibration"] + c1["heldout_retain"] == c1["retain_chunks"]
    assert balanced.calibration and balanced.heldout_retain and unbalanced.forget_eval


# --------------------------------------------------------------------------------------------------- end to end


def test_run_wmdp_bio_correct_subset(gpt2_dir, sae_dir, data, tmp_path):
    """The Bio YAML as is (correct-subset filter on): a random model usually keeps no question -> n=0, null."""
    cfg = _small(load_config(CONFIGS / "wmdp_bio_gemma2_2b.yaml", PaperConfig), gpt2_dir, sae_dir, data)
    out = tmp_path / "bio"
    res = run_paper(cfg, out, progress=False)
    disk = _check_common(res, out, cfg)
    q = disk["questions"]
    assert q["correct_subset"] and q["forget"]["n_loaded"] == N_Q and q["mmlu"]["n_loaded"] == 8
    assert len(q["forget"]["kept_indices"]) == q["forget"]["n_kept"] <= N_Q
    for name, entry in disk["methods"].items():
        _check_mcq(entry["forget"], q["forget"]["n_kept"], name != "base")
        assert entry["mmlu"]["n"] == q["mmlu"]["n_kept"]
        assert set(entry["mmlu"]["per_subject"]) == set(cfg.subjects)
        assert _in01(entry["mmlu"]["pooled"])
        if entry["mmlu"]["n"] == 0:
            assert entry["mmlu"]["pooled"] is None
    if q["forget"]["n_kept"]:  # filtered for the base model: it scores 100 % by construction
        assert disk["methods"]["base"]["forget"]["accuracy"] == 1.0
    assert [p["c"] for p in disk["sweep"]] == [1.0, 3.0]
    if q["forget"]["n_kept"] == 0 or q["mmlu"]["n_kept"] == 0:
        assert disk["unlearning_score"] is None and disk["unlearning_score_note"]


def test_run_wmdp_cyber_unfiltered(gpt2_dir, sae_dir, data, tmp_path):
    """The Cyber YAML with the filter off: every question is scored, and the unlearning score is computed."""
    cfg = _small(load_config(CONFIGS / "wmdp_cyber_gemma2_2b.yaml", PaperConfig), gpt2_dir, sae_dir, data,
                 correct_subset=False, min_mmlu=0.0, questions=str(data["dir"] / "questions_one_too_long.json"))
    assert cfg.dsg.p_ratio == 90.0 and "college_biology" in cfg.subjects
    out = tmp_path / "cyber"
    res = run_paper(cfg, out, progress=False)
    disk = _check_common(res, out, cfg)
    q = disk["questions"]["forget"]
    assert (q["n_loaded"], q["n_too_long"], q["n_kept"], q["kept_indices"]) == (N_Q, 1, N_Q - 1, list(range(N_Q - 1)))
    assert disk["questions"]["mmlu"]["n_kept"] == 8 and disk["questions"]["mmlu"]["n_too_long"] == 0
    for name, entry in disk["methods"].items():
        assert entry["forget"]["n"] == N_Q - 1 and 0 <= entry["forget"]["accuracy"] <= 1
        assert entry["mmlu"]["n"] == 8 and 0 <= entry["mmlu"]["pooled"] <= 1
        if name == "static":
            assert entry["forget"]["gate_rate"] == 1.0  # static clamping gates every input
    assert all(0 <= p["forget_acc"] <= 1 and 0 <= p["mmlu_acc"] <= 1 for p in disk["sweep"])
    assert disk["unlearning_score"] == pytest.approx(1 - min(p["forget_acc"] for p in disk["sweep"]))


def test_run_muse_news(gpt2_dir, sae_dir, data, tmp_path):
    cfg = _small(load_config(CONFIGS / "muse_news_gemma2_2b.yaml", PaperConfig), gpt2_dir, sae_dir, data)
    out = tmp_path / "muse"
    res = run_paper(cfg, out, progress=False)
    disk = _check_common(res, out, cfg)
    assert disk["questions"]["knowmem_retain"]["path"].endswith("retain2_qa.json")
    assert disk["questions"]["knowmem_forget_icl"]["path"].endswith("forget_qa_icl.json")
    for name, entry in disk["methods"].items():
        assert set(entry) == {"knowmem_forget", "knowmem_retain", "verbmem"}
        for block in entry.values():
            assert block["n"] == N_Q and _in01(block["rougeL_recall"]) and _in01(block["rougeL_f1"])
            if name != "base":
                assert _in01(block["gate_rate_prompt"]) and _in01(block["gate_rate_any_step"])
    assert disk["methods"]["static"]["verbmem"]["gate_rate_prompt"] == 1.0
    rows = [json.loads(line) for line in (out / disk["generations_file"]).read_text().splitlines()]
    assert len(rows) == 3 * 3 * N_Q
    assert all(r["prompt_tokens"] <= 48 for r in rows) and any(r["truncated"] for r in rows)


def test_run_bfloat16_model(gpt2_dir, sae_dir, data, tmp_path):
    """The real configs run the model and SAE in bfloat16: letter scoring and the guardrail must cope."""
    cfg = _small(load_config(CONFIGS / "wmdp_cyber_gemma2_2b.yaml", PaperConfig), gpt2_dir, sae_dir, data,
                 correct_subset=False, methods=["dsg", "static"], sweep_c=[3.0],
                 **{"model.dtype": "bfloat16", "sae.dtype": "bfloat16"})
    res = run_paper(cfg, tmp_path / "bf16", progress=False)
    for entry in res["methods"].values():
        assert entry["forget"]["n"] == N_Q and 0 <= entry["forget"]["accuracy"] <= 1
    assert res["methods"]["static"]["forget"]["gate_rate"] == 1.0
    assert Guardrail.load(tmp_path / "bf16" / "guardrail").slice.W_enc.dtype == torch.bfloat16
