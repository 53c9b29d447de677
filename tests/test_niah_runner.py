"""NIAH runner and CLI end to end on a tiny local Llama (hidden 64, 2 layers) with a local BPE tokenizer."""

import contextlib
import json
import os
import warnings

import pytest
import torch

from drope.cli import main
from drope.niah import decode, loading, profile, report, results, runner
from drope.niah.runner import NIAHError, RunConfig, SlowPathWarning, apply_rope_scaling, greedy_generate
from drope.niah.tasks import PromptBuilder
from niah_helpers import save_tiny_model, tiny_config, train_tokenizer

FAST = ["--trials", "1", "--max-new-tokens", "4", "--warmup", "0", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), lengths=[128, 256], tasks=["single"], depths=[0.0, 1.0], trials=2,
                attn="eager", max_new_tokens=4, warmup=0)
    base.update(kw)
    return RunConfig(**base)


def _niah(*args):
    return main(["niah", *map(str, args)])


def test_cli_end_to_end_eager(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _niah("--model", model_dir, "--lengths", "128,256", "--tasks", "single", "--depths", "0,1", "--attn", "eager",
               "--trace", "--out", out, *FAST)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "single" in printed and "prefill ms" in printed
    for name in ("results.json", "results.csv", "samples.jsonl", "heatmap_single.png", "accuracy_vs_length.png",
                 "traces/single-128.json", "traces/single-256.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["attn"] == "eager" and data["config"]["lengths"] == [128, 256]
    rows = data["results"]
    assert [(r["task"], r["length"], r["depth"]) for r in rows] == [
        ("single", 128, 0.0), ("single", 128, 1.0), ("single", 256, 0.0), ("single", 256, 1.0)]
    for r in rows:
        assert 0.0 <= r["partial"] <= 1.0 and r["accuracy"] in (0.0, 1.0)
        assert r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["new_tokens"] == 4
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + len(rows)
    trace = json.loads((out / "traces/single-128.json").read_text())
    assert trace["traceEvents"]


def test_cli_multi_needle_sdpa(model_dir, tmp_path):
    out = tmp_path / "run"
    rc = _niah("--model", model_dir, "--lengths", "256", "--tasks", "multikey,multiquery,multivalue", "--depths", "1",
               "--attn", "sdpa", "--haystack", "noise", "--out", out, *FAST)
    assert rc == 0
    data = report.load_run(out)
    assert sorted(r["task"] for r in data["results"]) == ["multikey", "multiquery", "multivalue"]
    assert all(r["depth"] == 0.5 for r in data["results"])
    for task in ("multikey", "multiquery", "multivalue"):
        assert (out / f"heatmap_{task}.png").is_file()
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {len(x["answers"]) for x in lines if x["task"] != "multikey"} == {4}


def test_greedy_matches_generate(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    s = PromptBuilder(tok).build("single", 200, 0.5)
    g = greedy_generate(model, s.input_ids, 6, [], torch.device("cpu"))
    ref = model.generate(torch.tensor([s.input_ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)[0, 200:].tolist()
    assert g.token_ids == ref
    assert g.decode_steps == 5 and g.prefill_ms > 0 and g.decode_tok_s > 0


def test_scoring_through_the_runner(model_dir, tmp_path, monkeypatch):
    """A generation that reads the answers (all, or half of them) scores 1 (or partial 0.5) in the results."""
    tok = train_tokenizer()
    real = decode.greedy_generate
    state = {}

    def oracle(model, input_ids, max_new_tokens, eos_ids, device):
        g = real(model, input_ids, 1, eos_ids, device)
        s = state["builder"].build(state["task"], len(input_ids), state["depth"], trial=state["trial"])
        assert s.input_ids == list(input_ids)
        answers = s.answers[: max(1, len(s.answers) // 2)] if state["half"] else s.answers
        g.token_ids = tok(" " + ", ".join(answers) + ".", add_special_tokens=False)["input_ids"]
        state["trial"] += 1
        return g

    monkeypatch.setattr(decode, "greedy_generate", oracle)
    state["builder"] = PromptBuilder(tok)
    for task, half, expected in [("multiquery", False, (1.0, 1.0)), ("multivalue", True, (0.0, 0.5))]:
        state.update(task=task, depth=0.5, trial=0, half=half)
        res = runner.run(_cfg(model_dir, lengths=[256], tasks=[task], depths=[0.5]), tmp_path / task, progress=False)
        (row,) = res["results"]
        assert (row["accuracy"], row["partial"]) == expected


def test_resume_after_interruption(model_dir, tmp_path):
    out = tmp_path / "run"
    calls = []

    def stop_at_256(sample, gen):
        if sample.length == 256:
            raise KeyboardInterrupt
        calls.append(sample.length)

    with pytest.raises(KeyboardInterrupt):
        runner.run(_cfg(model_dir), out, progress=False, on_request=stop_at_256)
    saved = json.loads((out / "results.json").read_text())["results"]
    assert [(r["length"], r["depth"]) for r in saved] == [(128, 0.0), (128, 1.0)] and len(calls) == 4

    with pytest.raises(NIAHError, match="already exists.*--resume"):
        runner.run(_cfg(model_dir), out, progress=False)
    with pytest.raises(NIAHError, match="different settings: trials=2"):
        runner.run(_cfg(model_dir, trials=3), out, resume=True, progress=False)

    calls.clear()
    res = runner.run(_cfg(model_dir), out, resume=True, progress=False, on_request=lambda s, g: calls.append(s.length))
    assert calls == [256] * 4
    assert res["results"][:2] == saved and len(res["results"]) == 4
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8


def test_bad_inputs(model_dir, tmp_path, capsys):
    def err(*args):
        assert _niah(*args, "--out", tmp_path / "bad", *FAST) == 2
        return capsys.readouterr().err

    assert "does not exist" in err("--model", tmp_path / "nowhere", "--lengths", "128")
    no_tok = tmp_path / "no-tokenizer"
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_config(300)).save_pretrained(no_tok)
    assert "no usable tokenizer" in err("--model", no_tok, "--lengths", "128")
    assert "unknown attention implementation 'flash_attn_9'" in err("--model", model_dir, "--attn", "flash_attn_9")
    assert "unknown task needle" in err("--model", model_dir, "--tasks", "single,needle")
    assert "not a positive token count" in err("--model", model_dir, "--lengths", "4q")
    msg = err("--model", model_dir, "--lengths", "128,256", "--tasks", "single", "--memory-budget-mb", "0.05")
    assert "cannot fit" in msg and "length 256: needs ~" in msg and "KV cache" in msg
    assert "too short for task 'multiquery'" in err("--model", model_dir, "--lengths", "64", "--tasks", "multiquery")
    assert "is not TYPE:FACTOR" in err("--model", model_dir, "--rope-scaling", "ntk:2")
    assert "DroPE" in err("--model", model_dir, "--lengths", "128", "--temperature", "position:0.1:128")
    assert "MODE:COEF:TRAIN_LENGTH" in err("--model", model_dir, "--temperature", "position:0.1")
    assert "--model is required" in err("--lengths", "128")
    # issue 24: an output folder that cannot be made is said before any model is loaded
    assert _niah("--model", tmp_path / "nowhere", "--out", "/proc/drope-x", *FAST) == 2
    assert "--out /proc/drope-x: cannot be created" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert _niah("--model", model_dir, "--out", tmp_path / "a-file", *FAST) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "results.json").exists()
    avail = runner.available_attn_implementations()
    if avail["flash_attention_2"]:
        assert "flash_attention_2 is not available" in err("--model", model_dir, "--attn", "flash_attention_2")


def test_rope_scaling_goes_through_transformers():
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(tiny_config(300)).model.rotary_emb.inv_freq
    for spec, rope_type in [("linear:2", "linear"), ("yarn:4", "yarn"), ("dynamic:2:128", "dynamic"),
                            ("llama3:8", "llama3")]:
        config = tiny_config(300)
        params = apply_rope_scaling(config, spec)
        assert params["rope_type"] == rope_type and params["rope_theta"] == 10000.0
        rotary = LlamaForCausalLM(config).model.rotary_emb
        assert rotary.rope_type == rope_type
        if rope_type == "linear":
            torch.testing.assert_close(rotary.inv_freq, base / 2)
        if rope_type == "yarn":
            assert params["original_max_position_embeddings"] == 256 and rotary.attention_scaling > 1
        if rope_type == "dynamic":
            assert config.max_position_embeddings == 128
    with pytest.raises(NIAHError, match="short_factor/long_factor"):
        apply_rope_scaling(tiny_config(300), "longrope:4")
    with pytest.raises(NIAHError, match="factor must be >= 1"):
        apply_rope_scaling(tiny_config(300), "yarn:0.5")
    nope = tiny_config(300)
    nope.rope_parameters = {}
    with pytest.raises(NIAHError, match="applies to RoPE models"):
        apply_rope_scaling(nope, "yarn:2")


def test_rope_scaling_run_records_parameters(model_dir, tmp_path, capsys):
    out = tmp_path / "yarn"
    assert _niah("--model", model_dir, "--lengths", "256", "--tasks", "single", "--depths", "1",
                 "--rope-scaling", "yarn:2", "--out", out, *FAST) == 0
    cfg = report.load_run(out)["config"]
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["factor"] == 2.0
    assert cfg["rope_type_in_model"] == ["yarn"]
    # report-only mode: compare two runs without a model
    other = tmp_path / "base"
    assert _niah("--model", model_dir, "--lengths", "256", "--tasks", "single", "--depths", "1", "--out", other,
                 "--label", "base", *FAST) == 0
    assert _niah("--compare", out, other / "results.json", "--out", tmp_path / "cmp") == 0
    assert (tmp_path / "cmp" / "accuracy_vs_length.png").is_file()
    assert "base" in capsys.readouterr().out


def _drope_triton_or_skip():
    why = runner.available_attn_implementations()["drope_triton"]
    if why:
        pytest.skip(f"drope_triton is not registered in this checkout: {why}")


@pytest.mark.interpreter
def test_runner_drope_triton_matches_eager(model_dir, tmp_path):
    """The sweep with attn=drope_triton generates what eager generates (float32, same samples)."""
    _drope_triton_or_skip()
    preds = {}
    for attn in ("eager", "drope_triton"):
        out = tmp_path / attn
        interpreted = attn == "drope_triton" and runner.kernels_interpreted()
        with pytest.warns(SlowPathWarning, match="interpreter") if interpreted else contextlib.nullcontext():
            res = runner.run(_cfg(model_dir, lengths=[128], depths=[0.5], trials=1, attn=attn), out, progress=False)
        assert res["config"]["attn_implementation"] == attn and res["results"][0]["decode_tok_s"] > 0
        preds[attn] = [json.loads(x)["prediction"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert preds["drope_triton"] == preds["eager"]


def test_out_of_memory_and_ctrl_c_keep_finished_cells(model_dir, tmp_path, monkeypatch, capsys):
    real = decode.greedy_generate

    def oom_at_256(model, input_ids, *args):
        if len(input_ids) == 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, input_ids, *args)

    monkeypatch.setattr(decode, "greedy_generate", oom_at_256)
    out = tmp_path / "oom"
    assert _niah("--model", model_dir, "--lengths", "128,256", "--tasks", "single", "--depths", "1", "--out", out,
                 *FAST) == 1
    assert "out of memory at length 256" in capsys.readouterr().err
    data = report.load_run(out)
    assert [r["length"] for r in data["results"]] == [128] and data["errors"][0]["length"] == 256
    assert (out / "results.csv").is_file() and (out / "heatmap_single.png").is_file()

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "greedy_generate", interrupt)
    assert _niah("--model", model_dir, "--lengths", "128,256", "--tasks", "single", "--depths", "1", "--out", out,
                 "--resume", *FAST) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    assert [r["length"] for r in report.load_run(out)["results"]] == [128]


def test_temperature_on_a_drope_model(tmp_path):
    try:
        from drope.hf import to_drope
    except ImportError as e:
        pytest.skip(f"drope.hf (to_drope, set_temperature) is not importable here: {e}")
    from transformers import LlamaForCausalLM

    path = tmp_path / "tiny-drope"
    tok = train_tokenizer()
    to_drope(LlamaForCausalLM(tiny_config(len(tok))), qk_norm="full").save_pretrained(path)
    tok.save_pretrained(path)
    cfg = _cfg(path, lengths=[128], depths=[0.5], trials=1, temperature="position:0.5:64")
    res = runner.run(cfg, tmp_path / "out", progress=False)
    assert res["config"]["drope_temperature"]["mode"] == "position" and len(res["results"]) == 1
    with pytest.raises(NIAHError, match="this is a DroPE model"):
        runner.run(_cfg(path, rope_scaling="yarn:2"), tmp_path / "out2", progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "drope_triton"])
def test_smollm360m_shape_32k_profile(tmp_path, attn):
    """SmolLM-360M-shaped random model at 32k in bf16: prefill and decode profile, per attention."""
    if attn == "drope_triton":
        _drope_triton_or_skip()
    from transformers import LlamaForCausalLM

    tok = train_tokenizer()
    config = tiny_config(
        49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, max_position_embeddings=2048, rope_theta=10000.0,
    )
    path = tmp_path / "smollm-360m-shaped"
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = RunConfig(model=str(path), lengths=[32768], tasks=["single"], depths=[0.5], trials=1, attn=attn,
                    dtype="bfloat16", max_new_tokens=32, warmup=1)
    res = runner.run(cfg, tmp_path / "out", progress=False)
    (row,) = res["results"]
    print(f"\n{attn} 32k: prefill {row['prefill_ms']:.0f} ms, decode {row['decode_tok_s']:.1f} tok/s, "
          f"peak {row['peak_mem_mb']:.0f} MiB")
    assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0
    # weights (~0.7 GiB) + bf16 KV cache at 32k (~1.3 GiB) + O(L) activations: far below an L^2 score matrix
    assert row["peak_mem_mb"] < 8 * 1024


def test_each_request_decoded_and_scored_once(model_dir, tmp_path, monkeypatch):
    calls = []
    real = results.score
    monkeypatch.setattr(results, "score", lambda pred, answers, value_type="number":
                        calls.append(pred) or real(pred, answers, value_type))
    res = runner.run(_cfg(model_dir, lengths=[128], depths=[0.0, 1.0], trials=2), tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(calls) == len(lines) == 4
    assert [x["prediction"] for x in lines] == calls
    assert [r["accuracy"] for r in res["results"]] == [
        sum(x["accuracy"] for x in lines[i:i + 2]) / 2 for i in (0, 2)]


def test_short_length_refused_before_loading_with_k_hint(model_dir, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load before the lengths are checked")

    monkeypatch.setattr(runner, "load_model", no_load)
    assert _niah("--model", model_dir, "--lengths", "32", "--tasks", "single", "--out", tmp_path / "x", *FAST) == 2
    err = capsys.readouterr().err
    assert "--lengths: length 32 is too short" in err and "did you mean 32k" in err
    with pytest.raises(NIAHError, match="did you mean 64k"):
        runner.run(_cfg(model_dir, lengths=[64], tasks=["multiquery"]), tmp_path / "y", progress=False)


def test_no_loading_weights_bars(model_dir, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    runner.run(_cfg(model_dir, lengths=[128], depths=[0.5], trials=1), tmp_path / "run", progress=False)
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before


def test_memory_estimate_follows_attention_and_device(monkeypatch):
    config = tiny_config(300, num_attention_heads=2, num_key_value_heads=2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def est(attn, device, length=16384):
        return profile.estimate_memory_mb(config, length, 32, torch.float32, attn, device)["activations_mb"]

    monkeypatch.setattr(profile, "cpu_backend", lambda: "torch")
    # drope_triton's CPU kernels (drope/kernels/cpu) run PyTorch's CPU flash attention: O(L), like sdpa
    assert not profile.attention_path("drope_triton", cpu)["quadratic"]
    assert not profile.attention_path("drope_triton", cuda)["quadratic"]
    assert not profile.attention_path("sdpa", cpu)["quadratic"] and profile.attention_path("eager", cuda)["quadratic"]
    assert est("sdpa", cpu) == est("drope_triton", cuda) == est("drope_triton", cpu) < 100
    # eager: 2 heads x 16k x 16k scores, growing with the square of the length
    assert est("eager", cpu) > 1024
    assert est("eager", cpu, 32768) == pytest.approx(4 * est("eager", cpu), rel=0.05)
    monkeypatch.setattr(profile, "cpu_backend", lambda: "interpreter")
    assert not profile.attention_path("drope_triton", cpu)["quadratic"]
    assert profile.attention_path("drope_triton", cpu)["slow"]


def test_refusal_names_only_implementations_that_fit(model_dir, tmp_path, monkeypatch):
    """A length that eager (S x S scores) cannot fit is refused before the run, naming what does fit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    need = {a: profile.estimate_memory_mb(config, 4096, 4, torch.float32, a, "cpu")["total_mb"]
            for a in ("sdpa", "eager")}
    budget = (need["sdpa"] + need["eager"]) / 2
    with pytest.raises(NIAHError) as e:
        runner.run(_cfg(model_dir, lengths=[4096], attn="eager", device="cpu", memory_budget_mb=budget),
                   tmp_path / "a", progress=False)
    assert "length 4096: needs ~" in str(e.value) and "--attn sdpa" in str(e.value)


def test_interpreter_set_after_import_runs_the_cpu_kernels(model_dir, tmp_path, monkeypatch):
    """TRITON_INTERPRET exported after drope was imported no longer traps a run: the kernels were defined for a GPU,
    so CPU tensors take drope's PyTorch kernels (ops.cpu_backend: what Triton fixed at import), with no warning."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(profile, "cpu_backend", lambda: "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        path = loading.check_attention_path("drope_triton", torch.device("cpu"))
    assert "CPU kernels" in path["path"] and not path["slow"]


@pytest.mark.interpreter
def test_kernels_interpreted_reports_how_triton_built_them():
    from drope.kernels import ops

    assert runner.kernels_interpreted() is (ops.cpu_backend() == "interpreter")
    assert runner.kernels_interpreted() is (os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available())


def test_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(profile.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(profile.torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(profile.os, "getloadavg", lambda: (2.2, 1.0, 1.0))
    assert profile.choose_threads("auto") == 2
    monkeypatch.setattr(profile.os, "getloadavg", lambda: (7.0, 1.0, 1.0))
    assert profile.choose_threads(None) == 1
    monkeypatch.setattr(profile.os, "getloadavg", lambda: (0.1, 1.0, 1.0))
    assert profile.choose_threads("auto") == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert profile.choose_threads("auto") == 3  # torch read OMP_NUM_THREADS at start-up: its count stands
    assert profile.choose_threads("3") == 3 and profile.choose_threads(2) == 2
    for bad in ("0", "-1", "many", True):
        with pytest.raises(ValueError, match="--threads"):
            profile.choose_threads(bad)


def test_cli_threads_and_help_defaults(model_dir, tmp_path, capsys):
    assert _niah("--model", model_dir, "--threads", "zero", "--out", tmp_path / "x") == 2
    assert "--threads must be auto or a positive int" in capsys.readouterr().err
    for command, expected in [("niah", ["(default: 5)", "(default: sdpa)", "(default: 4k,8k,16k,32k)",
                                        "(default: auto)"]),
                              ("demo", ["(default: drope-demo)", "(default: 1,2,4,8)", "(default: auto)"]),
                              ("train-mini", ["(default: 5000)", "(default: 0.4)", "(default: auto)",
                                              "(default: number,word)"]),
                              ("fit-temperature", ["(default: 200)", "(default: only print the fit)"]),
                              ("recalibrate", [])]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        for text in expected:
            assert text in shown, (command, text)
        # an option without a default explains itself, never "(default: None)" or "(default: False)"
        assert "(default: None)" not in shown and "(default: False)" not in shown, command



def test_plots_keep_ties_visible_and_the_training_length_named(tmp_path):
    styles = [report.series_style(i, 6) for i in range(6)]
    assert len({s["dx"] for s in styles}) == 6 and len({s["marker"] for s in styles}) == 6
    assert styles[0]["linewidth"] > styles[-1]["linewidth"] and styles[0]["zorder"] < styles[-1]["zorder"]
    plt = report.pyplot()
    fig, ax = plt.subplots()
    report.log2_length_axis(ax, [4096, 8192, 32768])
    assert report.mark_train_length(ax, 2048)[1] == "training length 2k, left of the axis"
    assert report.mark_train_length(ax, 8192)[1] == "training length (8k)"
    assert report.mark_train_length(ax, None) is None
    plt.close(fig)
    one_cell = {"config": {"label": "one"}, "results": [
        {"task": "single", "length": 4096, "depth": 0.5, "accuracy": 1.0, "partial": 1.0}]}
    (path,) = report.plot_heatmaps(one_cell, tmp_path)
    height, width = plt.imread(path).shape[:2]
    assert height >= 300 and width >= 450
