"""CPU checks of the benchmark suite's pieces that need no GPU: formulas, shapes, providers' semantics
on tiny CPU inputs, the record schema writer and the report rendered from a synthetic record."""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, models, providers, records, report, timing  # noqa: E402


def test_attention_flops_formula():
    assert cases.attention_flops(2, 3, 5, 7, 64, causal=False) == 4 * 2 * 3 * 5 * 7 * 64
    assert cases.attention_flops(2, 3, 5, 7, 64, causal=True) == 2 * 2 * 3 * 5 * 7 * 64
    assert cases.attention_flops(2, 3, 5, 7, 64, causal=True, backward=True) == 2.5 * 2 * 2 * 3 * 5 * 7 * 64
    case = cases.Case("prefill_fwd_bwd", 4, 16, 4, 4096, 128)
    assert cases.case_flops(case) == 4 * 4 * 16 * 4096 * 4096 * 128 / 2 * 2.5
    assert cases.case_bytes(case) is None


def test_decode_bytes_and_metrics():
    case = cases.Case("decode", 16, 32, 8, 131072, 128)
    nbytes = 2 * 16 * 8 * 131072 * 128 * 2
    assert cases.decode_kv_bytes(16, 8, 131072, 128, 2) == nbytes == cases.case_bytes(case)
    assert cases.case_flops(case) is None
    m = records.metrics(case, 2.0, {"copy_gbps": 3000.0})
    assert m["gbps"] == pytest.approx(nbytes / 2e-3 / 1e9)
    assert m["frac_copy_bw"] == pytest.approx(m["gbps"] / 3000.0)
    assert m["tokens_per_s"] == pytest.approx(16 / 2e-3)
    assert m["tflops"] is None and m["cache_len"] == 131072
    p = records.metrics(cases.Case("prefill_fwd", 16, 16, 4, 1024, 128), 0.5)
    assert p["tflops"] == pytest.approx(4 * 16 * 16 * 1024 * 1024 * 128 / 2 / 0.5e-3 / 1e12) and p["gbps"] is None


def test_shapes_follow_the_issue():
    prefill = cases.prefill_cases()
    assert {c.op for c in prefill} == {"prefill_fwd", "prefill_fwd_bwd"}
    for c in prefill:
        assert c.dtype == "bfloat16" and c.D in (64, 128) and c.H == 2048 // c.D and c.G in (1, 4)
        assert c.B * c.S == 16384 or (c.S > 16384 and c.B == 1)
    assert {c.S for c in prefill} == {1024, 2048, 4096, 8192, 16384, 32768}
    decode = cases.decode_cases()
    assert {(c.H, c.Hkv, c.D) for c in decode} == {(32, 8, 128)}
    assert {c.B for c in decode} == {1, 4, 16}
    assert min(c.S for c in decode) == 4096 and max(c.S for c in decode) == 131072
    model = cases.model_cases()
    assert {(c.H, c.Hkv, c.D) for c in model} == {(15, 5, 64)}
    ids = [c.id for c in prefill + decode + model]
    assert len(ids) == len(set(ids))
    for ops in (prefill, decode, model):
        assert any(c.quick for c in ops) and not all(c.quick for c in ops)


def test_temperatures():
    beta = cases.position_temperature(40, train_len=16, coef=0.5)
    assert torch.all(beta[:16] == 1)
    assert beta[31].item() == pytest.approx(1 + 0.5 * math.log(2))
    assert cases.length_temperature(8192, train_len=2048, coef=0.1) == pytest.approx(1 + 0.1 * math.log(4))
    assert cases.length_temperature(1024, train_len=2048) == 1.0


def test_rotation_count_exceeds_twice_l2():
    l2 = 50 * 2**20
    assert timing.rotation_count(16 * 2**20, l2) == 7
    assert timing.rotation_count(10 * 2**30, l2) == 1
    assert timing.rotation_count(1, l2, cap=32) == 32


@pytest.mark.parametrize("op,shape", [("prefill_fwd", (1, 4, 2, 48, 32)), ("prefill_fwd_bwd", (2, 4, 1, 33, 32)),
                                      ("decode", (2, 4, 2, 77, 32))],
                         ids=["prefill_fwd-B1-H4-Hkv2-S48-D32", "prefill_fwd_bwd-B2-H4-Hkv1-S33-D32",
                              "decode-B2-H4-Hkv2-S77-D32"])
@pytest.mark.parametrize("provider", ["unfused", "sdpa_math", "sdpa_flash", "flex"])
def test_torch_providers_compute_drope_attention(op, shape, provider):
    """Each torch provider computes what the suite says it does (fp32 on CPU, fresh random inputs)."""
    if provider == "flex" and op == "prefill_fwd_bwd":
        pytest.skip("FlexAttention has no backward on CPU")
    case = cases.Case(op, *shape, dtype="float32")
    bound = providers.build_attention(case, provider, "cpu", train_len=16)
    assert bound["check"] is not None
    assert bound["check"]() <= 1e-5
    out = bound["call"](bound["sets"][0])
    if op == "prefill_fwd_bwd":
        assert len(out) == (5 if provider == "unfused" else 3) and all(torch.isfinite(g).all() for g in out)


def test_temperature_matters_in_the_check():
    """The check compares against the temperature-scaled reference: a provider without it would fail."""
    case = cases.Case("prefill_fwd", 1, 2, 2, 64, 32, dtype="float32")
    bound = providers.build_attention(case, "sdpa_math", "cpu", train_len=8)
    x = bound["sets"][0]
    shared = providers.shared_inputs(case, "cpu", train_len=8)
    wrong = torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    assert providers.rel_err(wrong, bound["prepared"].reference(x)) > 1e-3
    assert shared["len_scale"] > case.D ** -0.5


def test_provider_skips_state_reasons():
    case = cases.Case("prefill_fwd", 1, 2, 2, 64, 32, dtype="float32")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(providers.ProviderSkip, match="flash-attn is not installed"):
            providers.build_attention(case, "flash_attn", "cpu")
    with pytest.raises(ValueError, match="provider must be one of"):
        providers.build_attention(case, "nope", "cpu")
    big = cases.Case("prefill_fwd", 1, 16, 4, 32768, 128)
    assert "GiB of (Sq x Sk) logits" in providers.math_fits(big, 80 * 2**30)
    assert providers.math_fits(cases.Case("prefill_fwd", 16, 16, 4, 1024, 128), 80 * 2**30) is None
    assert "GiB of (S x S) weights" in models.eager_fits(cases.Case("model_prefill", 1, 15, 5, 65536, 64), 80 * 2**30)


def _synthetic_record():
    """A SYNTHETIC record (made-up numbers, not measured) to test the report and the writer."""
    rec = {"device": "SYNTHETIC test device", "torch": "0.0-synthetic", "triton": "0.0-synthetic", "cuda": None,
           "git_sha": "abc1234", "created_utc": "2026-01-02T03:04:05Z", "synthetic": True, "quick": True,
           "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 700.0}, "results": [], "failed": [],
           "skipped": [{"op": "prefill_fwd", "provider": "flash_attn", "B": 16, "H": 16, "Hkv": 4, "S": 1024,
                        "D": 128, "dtype": "bfloat16", "reason": "flash-attn is not installed/importable"}]}
    pre = cases.Case("prefill_fwd", 16, 16, 4, 1024, 128)
    for provider, ms in (("drope_triton", 1.0), ("unfused", 4.0), ("sdpa_flash", 2.0), ("sdpa_cudnn", 1.5)):
        rec["results"].append(records.result_entry(pre, provider, [ms] * 5, peak_mem_mb=10.0, ceilings=rec["ceilings"]))
    for S, ms in ((4096, 0.1), (32768, 0.5)):
        dec = cases.Case("decode", 1, 32, 8, S, 128)
        for provider, f in (("drope_triton", 1.0), ("sdpa_flash", 1.25)):
            rec["results"].append(records.result_entry(dec, provider, [ms * f] * 5, peak_mem_mb=None,
                                                      ceilings=rec["ceilings"]))
    mod = cases.Case("model_prefill", 1, 15, 5, 4096, 64)
    for provider, ms in (("drope_triton", 50.0), ("sdpa", 60.0)):
        rec["results"].append(records.result_entry(mod, provider, [ms] * 3, peak_mem_mb=100.0))
    gen = cases.Case("model_generate_batch", 16, 15, 5, 8192, 64)
    for provider, ms in (("sdpa", 3000.0), ("drope_triton", 2000.0)):
        rec["results"].append(records.result_entry(gen, provider, [ms] * 3, peak_mem_mb=900.0, first_ms=ms * 4,
                                                  tokens_per_s=16 * 128 / ms * 1e3, agree=15))
    return rec


def test_record_schema_and_writer(tmp_path):
    rec = _synthetic_record()
    path = records.write_record(rec, tmp_path)
    assert path.name == "synthetic-test-device-20260102-030405-abc1234.json"
    back = json.loads(path.read_text())
    records.validate_record(back)
    assert back["results"][0]["op"] == "prefill_fwd" and back["results"][0]["tflops"] > 0
    bad = json.loads(path.read_text())
    del bad["ceilings"]["copy_gbps"]
    with pytest.raises(ValueError, match="copy_gbps"):
        records.validate_record(bad)
    bad = json.loads(path.read_text())
    bad["results"][0]["ms"] = "fast"
    with pytest.raises(ValueError, match="'ms'"):
        records.validate_record(bad)
    bad = json.loads(path.read_text())
    del bad["results"][1]["peak_mem_mb"]
    with pytest.raises(ValueError, match="peak_mem_mb"):
        records.validate_record(bad)


def _is_png(path: Path) -> bool:
    head = path.read_bytes()[:24]
    return head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 100


def test_report_from_synthetic_record(tmp_path):
    path = records.write_record(_synthetic_record(), tmp_path / "results")
    written = report.write_report(path, tmp_path / "out")
    md = written[0].read_text()
    assert "Synthetic record" in md and "3000 GB/s" in md and "700 TFLOP/s" in md
    row = next(line for line in md.splitlines() if "| drope_triton |" in line and "| 1024 |" in line)
    # best SDPA is cudnn at 1.5 ms, unfused 4 ms: speedups 1.5x and 4x
    assert "1.50x (cudnn)" in row and "4.00x" in row
    drow = next(line for line in md.splitlines() if "| drope_triton |" in line and "| 32768 |" in line)
    assert "1.25x (flash)" in drow
    mrow = next(line for line in md.splitlines() if "| drope_triton |" in line and "| 4096 |" in line
                and "model" not in line and line.count("|") == 9)
    assert "1.20x" in mrow
    grow = next(line for line in md.splitlines() if "| drope_triton |" in line and "| 8192 |" in line)
    assert "| 8000 | 2000 | 1024 | 1.50x | 15 / 16 |" in grow
    assert "flash-attn is not installed" in md
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.name.rsplit("-", 1)[1] for p in pngs} == {"prefill.png", "decode.png"}
    assert all(_is_png(p) for p in pngs)


def test_report_picks_the_newest_record(tmp_path, capsys):
    old, new = _synthetic_record(), _synthetic_record()
    new["created_utc"] = "2026-02-01T00:00:00Z"
    records.write_record(old, tmp_path)
    newest = records.write_record(new, tmp_path)
    assert report.newest_record(tmp_path) == newest
    assert report.main([str(newest), "--out", str(tmp_path / "r")]) == 0
    assert "## decode" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no benchmark record"):
        report.newest_record(empty)


@pytest.mark.slow
def test_suite_runs_on_cpu_and_exits_zero():
    """`pytest benchmarks --benchmark-only` on a machine without CUDA: GPU cases skip with a reason, exit 0."""
    # a fresh pytest, not an xdist worker: pytest-benchmark disables itself when it sees xdist's variables
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST"))}
    env.update(TRITON_INTERPRET="1", DROPE_BENCH_PROVIDERS="unfused")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--quick", "-q",
                           "-p", "no:cacheprovider", "-rs"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in proc.stdout and "passed" in proc.stdout


def test_report_merges_runs_of_one_device(tmp_path, capsys):
    a, b = _synthetic_record(), _synthetic_record()
    b["created_utc"] = "2026-01-02T04:00:00Z"
    b["results"] = [r for r in b["results"] if r["op"] == "decode"]
    for r in b["results"]:
        r["ms"] *= 2
    pa, pb = records.write_record(a, tmp_path), records.write_record(b, tmp_path)
    assert report.main([str(pa), str(pb), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / (pa.stem + "-merged.json")).read_text())
    assert len(merged["results"]) == len(a["results"])
    assert [r["ms"] for r in merged["results"] if r["op"] == "decode"] == [r["ms"] for r in b["results"]]
    other = _synthetic_record()
    other["device"] = "another SYNTHETIC device"
    with pytest.raises(ValueError, match="different devices"):
        report.merge_records([a, other])
    capsys.readouterr()


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=101)


@pytest.mark.parametrize("provider", ["sdpa", "eager", "drope_triton"])
def test_model_cases_on_a_tiny_drope_model(provider):
    """The model ops run end to end; a decode step crops its cache back, so repetitions are alike."""
    try:
        model = models.build_model(TINY, "cpu", torch.float32)
    except providers.ProviderSkip as e:
        pytest.skip(str(e))
    assert model.config.num_hidden_layers == 2
    pre = models.build_model_case(model, cases.Case("model_prefill", 2, 4, 2, 24, 16, dtype="float32"), provider)
    logits = pre["call"](pre["sets"][0])
    assert logits.shape == (2, 1, 101) and torch.isfinite(logits).all()
    dec = models.build_model_case(model, cases.Case("model_decode", 1, 4, 2, 40, 16, dtype="float32"), provider)
    first = dec["call"](dec["sets"][0])
    second = dec["call"](dec["sets"][0])
    assert dec["cache"].get_seq_length() == 39
    torch.testing.assert_close(first, second)
    # the decode step's logits are the last row of a prefill of all 40 tokens
    with torch.inference_mode():
        ids = torch.cat([dec["prefix"], dec["sets"][0]], dim=1)
        full = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    assert providers.rel_err(first, full) <= 1e-4


def test_generation_throughput_ways_agree_with_greedy_alone():
    """benchmarks.generation: continuous batching and the left-padded batch return each prompt's greedy tokens
    alone (end of sequence disabled, not masked), and the four ways are named in the error for a fifth."""
    from benchmarks import generation

    model = models.build_model(TINY, "cpu", torch.float32)
    prompts = generation.mixed_prompts([4, 19, 9], TINY["vocab_size"], seed=1)
    model.set_attn_implementation("sdpa")
    want = generation.greedy_alone(model, prompts, 5)
    assert [len(t) for t in want] == [5, 5, 5]
    for provider in ("drope_triton", "sdpa_padded", "sdpa"):
        stats = generation.measure(model, prompts, provider, 5, rounds=1, want=want)
        assert stats["tokens"] == want and stats["agree"] == 3, provider
        assert stats["tokens_per_s"] > 0 and len(stats["times_ms"]) == 1
    assert getattr(model, "_cached_continuous_batching_manager", None) is None
    with pytest.raises(ValueError, match=r"provider must be one of drope_cb, sdpa, paged\|eager, drope_triton, sdpa_padded"):
        generation.generate(model, prompts, "flash", 5)
