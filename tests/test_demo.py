"""``drope demo``: the shipped mini checkpoints (load, round trip) and the comparison end to end on CPU."""

import argparse
import json
import shutil

import pytest
import torch

from drope.demo import cli
from drope.niah.tasks import TASKS, PromptBuilder

ROW_KEYS = {"model", "factor", "length", "task", "value_type", "accuracy"}


def _args(out, **over):
    # the CLI's defaults
    d = dict(out=str(out), model=[], factors="1,2,4,8", tasks="all", depths=",".join(map(str, cli.DEFAULT_DEPTHS)),
             trials=1, train_length=None, attn="auto", device="cpu", seed=0, ppl_windows=4, threads="auto",
             value_types=",".join(cli.DEFAULT_VALUE_TYPES))
    d.update(over)
    return argparse.Namespace(**d)


@pytest.mark.parametrize("name", cli.CHECKPOINTS)
def test_shipped_checkpoint_loads_and_round_trips(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cli.checkpoint_path(name)
    assert path.is_dir() and (path / "model.safetensors").stat().st_size < 8 * 2 ** 20
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path)
    L = model.config.max_position_embeddings
    if name == "rope":
        assert model.config.model_type == "llama"
    else:
        assert model.config.model_type == "llama_drope"
        assert model.config.attention_type == ("qk_norm_nope" if name == "drope" else "nope")
        temp = model.config.drope_temperature
        assert temp["mode"] == "length" and temp["train_length"] == L and temp["coef"] >= 0
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(3, len(tok), (2, 2 * L))  # beyond L_train, so the temperature acts
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, again(input_ids=ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tok.get_vocab()


def test_drope_models_generate_past_max_position_embeddings_without_a_warning():
    """A NoPE model has no position limit, so transformers' "exceeded the maximum length" reminder is off
    for the DroPE classes (and on, as before, for the RoPE model)."""
    import logging

    from transformers import AutoModelForCausalLM

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    logger.addHandler(handler)
    try:
        for name, warns in (("drope", False), ("nope", False), ("rope", True)):
            model = AutoModelForCausalLM.from_pretrained(cli.checkpoint_path(name), attn_implementation="sdpa").eval()
            L = model.config.max_position_embeddings
            logging.Logger.warning_once.cache_clear()  # transformers warns once per message and process
            records.clear()
            out = model.generate(input_ids=torch.randint(3, 100, (1, 2 * L)), max_new_tokens=2, min_new_tokens=2,
                                 do_sample=False, pad_token_id=0)
            assert out.shape[1] == 2 * L + 2
            assert any("maximum length" in r.getMessage() for r in records) == warns, name
    finally:
        logger.removeHandler(handler)


def test_shipped_tokenizer_builds_every_task_at_every_factor():
    from transformers import AutoTokenizer

    path = cli.checkpoint_path("rope")
    tok = AutoTokenizer.from_pretrained(path)
    L = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    builder = PromptBuilder(tok, chat_template="off")
    for task in TASKS:
        for f in cli.DEFAULT_FACTORS:
            sample = builder.build(task, f * L, 0.5, seed=0)
            assert len(sample.input_ids) == f * L


def test_resolve_models_default_and_directory(tmp_path):
    default = cli.resolve_models([])
    assert [label for label, _, _ in default] == list(cli.MODELS)
    assert dict((label, kind) for label, _, kind in default)["rope-ntk"] == "dynamic"
    for name in cli.CHECKPOINTS:
        shutil.copytree(cli.checkpoint_path(name), tmp_path / f"my{name}")
    labels = {label: kind for label, _, kind in cli.resolve_models([str(tmp_path)])}
    assert labels == {"mydrope": None, "mynope": None, "myrope": None, "myrope-pi": "linear",
                      "myrope-ntk": "dynamic", "myrope-yarn": "yarn"}
    with pytest.raises(ValueError, match="neither a model directory"):
        cli.resolve_models([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="several models are named"):
        cli.resolve_models([str(tmp_path / "mynope"), str(tmp_path / "mynope")])


def test_demo_reduced_grid_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.run(_args(out, factors="1,2", tasks="single,multivalue", depths="0.5", ppl_windows=1)) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = data["results"]
    assert len(rows) == len(cli.MODELS) * 2 * 2 * len(cli.DEFAULT_VALUE_TYPES)
    assert all(set(r) == ROW_KEYS and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert {r["value_type"] for r in rows} == {"number", "word"}
    assert (out / "accuracy_vs_factor_word.png").stat().st_size > 1000
    assert "(numbers)" in printed and "(words)" in printed
    words = json.loads((out / "runs" / "drope-word" / "samples.jsonl").read_text().splitlines()[0])
    assert all(a.isalpha() for a in words["answers"])
    assert {r["model"] for r in rows} == set(cli.MODELS)
    L = data["models"]["rope"]["train_length"]
    assert {(r["factor"], r["length"]) for r in rows} == {(1, L), (2, 2 * L)}
    assert data["config"]["attn"] == "sdpa"  # never Triton's interpreter on CPU
    assert (out / "accuracy_vs_factor.png").stat().st_size > 1000
    assert (out / "perplexity_vs_factor.png").stat().st_size > 1000
    assert "mean over tasks" in printed and "rope-yarn" in printed
    ppl = data["perplexity"]
    assert {(r["model"], r["factor"], r["length"]) for r in ppl} == {(m, f, f * L) for m in cli.MODELS for f in (1, 2)}
    assert all(1.0 < r["perplexity"] < 1e4 for r in ppl)
    # at 1x the scalings are the identity, so the RoPE baselines score the same documents the same way
    at1 = {r["model"]: r["perplexity"] for r in ppl if r["factor"] == 1}
    assert at1["rope-pi"] == pytest.approx(at1["rope"], rel=1e-5) and at1["rope-yarn"] == pytest.approx(at1["rope"], rel=1e-5)
    assert "perplexity" in printed
    runs = json.loads((out / "runs" / "rope-yarn-x2" / "results.json").read_text())
    assert runs["config"]["rope_parameters"]["rope_type"] == "yarn"
    assert runs["config"]["rope_parameters"]["factor"] == 2.0


def test_demo_user_model(tmp_path):
    results = cli.run_demo(tmp_path, models=[str(cli.checkpoint_path("drope"))], factors=[2], tasks=["single"],
                           depths=[0.5], device="cpu", value_types=["number"], log=lambda *_: None)
    assert [(r["model"], r["factor"], r["task"]) for r in results["results"]] == [("drope", 2, "single")]
    assert results["models"]["drope"]["temperature"]["mode"] == "length"


def test_held_out_perplexity_matches_full_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drope.demo.corpus import niah_stream

    path = cli.checkpoint_path("drope")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path)
    n = 2 * model.config.max_position_embeddings  # beyond L_train: the stored temperature acts
    ids = niah_stream(tok, n, 2, seed=3, split="eval")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    # chunked logits (100 positions at a time) give the plain full-logits perplexity
    assert cli.held_out_perplexity(model, tok, n, windows=2, seed=3, chunk=100) == pytest.approx(
        float(nll.exp()), rel=1e-4)
    # the evaluation documents are not the temperature-fit documents
    assert not torch.equal(ids, niah_stream(tok, n, 2, seed=3, split="fit"))
    with pytest.raises(ValueError, match="split"):
        niah_stream(tok, n, 1, split="test")


@pytest.mark.parametrize("over,match", [
    ({"factors": "0"}, "factors"), ({"factors": "two"}, "factors"), ({"trials": 0}, "trials"),
    ({"model": ["/nonexistent/model"]}, "neither"), ({"tasks": "single,haystack"}, "unknown task"),
    ({"ppl_windows": -1}, "ppl_windows"),
], ids=["factor0", "factor-text", "trials0", "missing-model", "bad-task", "ppl-windows-neg"])
def test_demo_bad_input(tmp_path, capsys, over, match):
    assert cli.run(_args(tmp_path, **over)) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_runs_and_reports_every_cell(tmp_path):
    # the demo's duration is a measured README figure (results.json "seconds"), never a test bound
    assert cli.run(_args(tmp_path / "full")) == 0
    data = json.loads((tmp_path / "full" / "results.json").read_text())
    assert len(data["results"]) == (len(cli.MODELS) * len(cli.DEFAULT_FACTORS) * len(TASKS)
                                    * len(cli.DEFAULT_VALUE_TYPES))
    assert len(data["perplexity"]) == len(cli.MODELS) * len(cli.DEFAULT_FACTORS)
