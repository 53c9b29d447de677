"""Context parallelism in the Hugging Face route (``drope.hf.context_parallel``), recalibration and NIAH across ranks.

Two process groups per module (``cp_worker.run_ranks``: one process per rank, gloo, file rendezvous in tmp_path,
drope's PyTorch CPU kernels, every process and the whole run bounded by a deadline): 3 ranks run the model cases
(the 1- and 2-rank ones on the subgroups of ranks 0 and 0-1), 2 ranks run ``drope niah --context-parallel 2`` and then
``drope recalibrate --context-parallel 2``. Tiny models (``hf_tiny``) are saved here; the oracle is the same model in
one process, eager attention, float64: the logits of each rank's rows, the loss, every parameter gradient after
the all-reduce, greedy tokens; the collectives of each forward, backward and decode step are counted. NIAH answers
and the recalibration's loss curve and weights are compared with the same commands in one process.
"""

from __future__ import annotations

import json

import pytest
import torch

import drope
from cp_worker import run_ranks
from helpers import rel_err
from hf_tiny import drope_model, rope_model, zoo_model
from test_recalibrate import workdir  # noqa: F401 - the fixture: a saved tiny RoPE Llama, its tokenizer, text files

WORKER = str(__import__("pathlib").Path(__file__).with_name("hf_cp_worker.py"))
GATHER = {"all_gather_single", "all_gather_into_tensor"}
SCATTER = {"reduce_scatter_single", "reduce_scatter_tensor"}
# fp32 ranks against the float64 one-process oracle
TOL = dict(logits=2e-6, loss=2e-6, grad=2e-5)
HEADS = [[0.1, 0.5, 0.2, 0.8], [0.6, 0.0, 0.3, 0.4]]  # per-head temperature coefficients, 2 layers x 4 heads
MODELS = {
    "drope-head": lambda: drope_model("llama", qk_norm="head", device="cpu",
                                      temperature={"mode": "position", "coef": 0.3, "train_length": 8}),
    "drope-full": lambda: drope_model("qwen2", qk_norm="full", device="cpu",
                                      temperature={"mode": "length", "coef": 0.4, "train_length": 8,
                                                   "head_coefs": HEADS}),
    "rope": lambda: rope_model("llama", device="cpu"),
    "window-sinks": lambda: zoo_model("gpt_oss", device="cpu"),
}
NIAH = ["niah", "--model", str(drope.__path__[0]) + "/demo/checkpoints/drope", "--lengths", "258,310", "--tasks",
        "single,multikey", "--depths", "0,1", "--trials", "1", "--value-type", "word", "--warmup", "0",
        "--no-progress", "--attn", "sdpa"]
# SGD: the update is linear in the gradient, so the weights after 2 steps compare to fp32 precision (Adam's first
# step, lr * g / (|g| + eps), turns fp32 noise in near-zero gradient entries into differences of up to lr)
RECAL = ["--seq-len", "32", "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "--save-steps", "100",
         "--no-progress", "--warmup", "0", "--lr", "0.5", "--trainer-arg", "optim=sgd"]


def rows_of(S: int, W: int, r: int, layout: str) -> list:
    """Global rows of rank r, written out independently of drope.distributed.layout."""
    if layout == "contiguous":
        return list(range(r * S // W, (r + 1) * S // W))
    c = S // (2 * W)
    return list(range(r * c, (r + 1) * c)) + list(range((2 * W - 1 - r) * c, (2 * W - r) * c))


def T(W, model, layout="headtail", B=1, S=None):
    return dict(kind="train", W=W, model_key=model, layout=layout, B=B, S=S or 8 * W,
                name=f"train-W{W}-{model}-{layout}-B{B}-S{S or 8 * W}")


def G(W, model, layouts, S, new=5):
    return dict(kind="generate", W=W, model_key=model, layouts=layouts, S=S, new=new,
                name=f"generate-W{W}-{model}-{'-'.join(layouts)}-S{S}")


TRAIN = [T(1, "drope-full", B=2), T(2, "drope-head", B=2, S=16), T(2, "drope-full", "contiguous", S=24), T(2, "rope"),
         T(2, "window-sinks", S=24), T(3, "drope-head", S=24), T(3, "drope-full", B=2, S=36)]
# prompt lengths: 13 leaves one token after the sharded prefix (W=2 head-tail), 20 two and 23 five (W=3)
GENERATE = [G(2, "drope-head", ["headtail", "contiguous"], 13, new=6), G(1, "drope-head", ["headtail"], 9),
            G(2, "window-sinks", ["contiguous", "headtail"], 19), G(3, "drope-full", ["headtail"], 20),
            G(3, "rope", ["headtail", "contiguous"], 23)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp-models")
    paths = {}
    for key, build in MODELS.items():
        build().save_pretrained(root / key)
        paths[key] = str(root / key)
    return paths


def batch_of(case, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed + case["S"] + 7 * case["W"])
    ids = torch.randint(3, 96, (case["B"], case["S"]), generator=g)
    labels = ids.clone()
    labels[:, torch.randint(0, case["S"], (3,), generator=g)] = -100  # ignored targets, some on chunk edges
    labels[0, case["S"] // (2 * case["W"])] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory):
    """The model cases on 3 ranks (W = 2 on ranks 0 and 1)."""
    cases = []
    for case in TRAIN:
        cases.append(dict(case, model=models[case["model_key"]], batch=batch_of(case)))
    for case in GENERATE:
        g = torch.Generator().manual_seed(case["S"])
        cases.append(dict(case, model=models[case["model_key"]], prompt=torch.randint(3, 96, (1, case["S"]),
                                                                                      generator=g)))
    cases.append(dict(kind="errors", W=3, name="errors", model=models["drope-head"],
                      batch=batch_of(dict(B=1, S=24, W=3))))
    out = run_ranks(tmp_path_factory.mktemp("cp-ranks"), 3, cases, script=WORKER, interpret=False, deadline_s=240)
    for r, res in enumerate(out):
        for name, value in res.items():
            assert not (isinstance(value, dict) and "raised" in value), f"rank {r} {name}: {value['raised']}"
    return out


def oracle(path):
    from transformers import AutoModelForCausalLM

    # float64: the MoE experts of gpt_oss in plain loops (transformers' grouped_mm takes no float64)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                experts_implementation="eager").double()


@pytest.mark.parametrize("case", TRAIN, ids=[c["name"] for c in TRAIN])
def test_logits_loss_and_gradients_equal_one_process(case, ranks, models):
    model = oracle(models[case["model_key"]]).train()
    batch = batch_of(case)
    ref = model(**batch)
    ref.loss.backward()
    W, S = case["W"], case["S"]
    got = [ranks[r][case["name"]] for r in range(W)]
    for r, res in enumerate(got):
        want = ref.logits[:, rows_of(S, W, r, case["layout"])]
        assert rel_err(res["logits"], want) < TOL["logits"], f"rank {r}"
        assert res["positions"][0].tolist() == rows_of(S, W, r, case["layout"])
        assert rel_err(res["loss"], ref.loss) < TOL["loss"], f"rank {r}: global loss"
        assert res["impl_after"] == "eager"  # the model's own implementation is back after the block
    # the shares (local token losses over the global count) add up to the loss
    assert rel_err(sum(res["share"] for res in got), ref.loss) < TOL["loss"]
    for name, p in model.named_parameters():
        for r, res in enumerate(got):
            assert rel_err(res["grads"][name], p.grad) < TOL["grad"], f"rank {r} {name}"


@pytest.mark.parametrize("case", TRAIN, ids=[c["name"] for c in TRAIN])
def test_collectives_per_layer(case, ranks, models):
    """Per forward: one signature all-gather and one all-gather of the position ids; per layer: one K/V all-gather
    forward, one all-gather + one reduce-scatter backward; the gradients: one all-reduce (one dtype)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models[case["model_key"]])
    L, W, B, S = config.num_hidden_layers, case["W"], case["B"], case["S"]
    kv = 2 * B * config.num_key_value_heads * S * config.head_dim
    for r in range(W):
        res = ranks[r][case["name"]]
        fwd, bwd = res["fwd"], res["bwd"]
        assert [c[0] in GATHER for c in fwd] == [True] * (2 + L), fwd
        assert [c[2] for c in fwd[:2]] == ["torch.float64", "torch.int64"] and fwd[1][1] == B * S
        assert [(c[1], c[2]) for c in fwd[2:]] == [(kv, "torch.float32")] * L
        assert [c[0] in (GATHER if i % 2 == 0 else SCATTER) for i, c in enumerate(bwd)] == [True] * (2 * L), bwd
        assert [c[1] for c in bwd] == [kv, kv // W] * L
        assert [c[0] for c in res["grad_calls"]] == ["all_reduce"]


def greedy_oracle(path, prompt, new):
    """Greedy tokens and each step's logits, one process, float64 (the one-process loop NIAH uses)."""
    from drope.niah.decode import CachedDecoder

    decoder = CachedDecoder(oracle(path).eval())
    with torch.no_grad():
        tokens, logits = [decoder.prefill(prompt)], [decoder.logits]
        while len(tokens) < new:
            tokens.append(decoder.step(tokens[-1]))
            logits.append(decoder.logits)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("case", GENERATE, ids=[c["name"] for c in GENERATE])
def test_greedy_tokens_equal_one_process(case, ranks, models):
    g = torch.Generator().manual_seed(case["S"])
    prompt = torch.randint(3, 96, (1, case["S"]), generator=g)
    want, want_logits = greedy_oracle(models[case["model_key"]], prompt, case["new"])
    for r in range(case["W"]):
        for layout, res in ranks[r][case["name"]].items():
            if case["model_key"] == "window-sinks" and layout == "headtail":
                # a window over a head-tail prompt needs positions in rank order: refused, on every rank
                assert res["raised"][0] == "ValueError" and "layout='contiguous'" in res["raised"][1]
                continue
            assert "raised" not in res, res
            assert res["tokens"].tolist() == want.tolist(), (r, layout)
            assert rel_err(res["logits"], want_logits) < TOL["logits"], (r, layout)


def test_decode_steps_move_one_merge_per_layer(ranks):
    """The prefill: the sharded prefix (signature, positions, one K/V all-gather per layer), then the last token as a
    decode step. A decode step: one signature all-gather, then per layer one all-gather of every rank's (out, lse)."""
    case = GENERATE[0]  # 13 tokens on 2 ranks: a prefix of 12, then 1 token; 2 layers, Hq 4, Hkv 2, D 16
    W, L, HQ, HKV, D = 2, 2, 4, 2, 16
    merge = [(W * HQ * (D + 1), "torch.float32")] * L
    for r in range(W):
        for layout, res in ranks[r][case["name"]].items():
            prefill = res["prefill"]
            assert all(c[0] in GATHER for c in prefill) and len(prefill) == (2 + L) + (1 + L), prefill
            assert [(c[1], c[2]) for c in prefill[2:2 + L]] == [(2 * HKV * 12 * D, "torch.float32")] * L
            assert [(c[1], c[2]) for c in prefill[3 + L:]] == merge
            assert len(res["steps"]) == case["new"] - 1
            for step in res["steps"]:
                assert [c[0] in GATHER for c in step] == [True] * (1 + L), step
                assert step[0][2] == "torch.float64" and [(c[1], c[2]) for c in step[1:]] == merge


def test_bad_input_raises_on_every_rank(ranks):
    expect = {"odd_length": "input_ids", "padding": "attention_mask", "local_positions": "position_ids",
              "rows_differ": "rows of input_ids", "short_prompt": "input_ids", "labels_shape": "labels",
              "nested": "already inside", "outside": "drope_cp"}
    for r in range(3):
        res = ranks[r]["errors"]
        for name, needle in expect.items():
            kind, message = res[name]
            assert kind == "ValueError" and needle in message, (r, name, message)
        assert res["after"] == "eager"


def test_no_process_group_and_bad_settings_raise_here(models):
    from drope.hf.parallel import context_parallel
    from drope.hf.sharded_decode import greedy_generate
    from drope.hf.recalibrate import RecalibrateConfig
    from drope.niah.runner import NIAHError, RunConfig

    model = oracle(models["drope-head"])
    with pytest.raises(ValueError, match="group"):
        with context_parallel(model):
            pass
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, torch.ones(1, 9, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="layout"):
        with context_parallel(model, layout="ring"):
            pass
    for bad in (dict(context_parallel=0), dict(context_parallel=2, packed=True), dict(context_parallel=3, seq_len=20)):
        with pytest.raises(ValueError, match="context_parallel"):
            RecalibrateConfig(**bad)
    with pytest.raises(NIAHError, match="context_parallel"):
        RunConfig(model="m", lengths=[256], context_parallel=0)


def test_the_commands_refuse_a_world_that_is_not_the_context_group(workdir, tmp_path, capsys):
    from drope.cli import main
    from drope.hf.recalibrate import recalibrate

    with pytest.raises(ValueError, match="context_parallel=2 runs on a world of 2 processes.*this run has 1"):
        recalibrate(workdir / "model", workdir / "data", tmp_path / "r", seq_len=32, max_steps=1, context_parallel=2,
                    show_progress=False)
    assert main(NIAH + ["--out", str(tmp_path / "n"), "--context-parallel", "2"]) == 2
    assert "runs under torchrun --nproc_per_node 2" in capsys.readouterr().err


# ---------------------------------------------------------------- the CLIs across 2 ranks


@pytest.fixture(scope="module")
def clis(workdir, tmp_path_factory):
    """``drope niah`` then ``drope recalibrate`` with ``--context-parallel 2`` on 2 ranks, and each in one process."""
    from drope.cli import main

    root = tmp_path_factory.mktemp("cp-cli")
    recal = ["recalibrate", str(workdir / "model"), str(workdir / "data"), *RECAL]
    cases = [dict(kind="cli", name="niah", argv=NIAH + ["--out", str(root / "niah-cp"), "--context-parallel", "2"]),
             dict(kind="cli", name="recalibrate", argv=recal + ["-o", str(root / "recal-cp"), "--context-parallel",
                                                                 "2"])]
    out = run_ranks(root, 2, cases, script=WORKER, interpret=False, deadline_s=240)
    assert main(NIAH + ["--out", str(root / "niah-one")]) == 0
    assert main(recal + ["-o", str(root / "recal-one")]) == 0
    return root, out


def test_niah_across_two_ranks_answers_as_one_process(clis):
    root, out = clis
    assert [r["niah"]["rc"] for r in out] == [0, 0]
    one, cp = (json.loads((root / d / "results.json").read_text()) for d in ("niah-one", "niah-cp"))
    assert cp["config"]["context_parallel"] == 2 and "drope.distributed over 2 ranks" in cp["config"]["attention_path"]
    keys = ("task", "length", "depth", "accuracy", "partial", "new_tokens", "needle_token_index")
    assert [{k: r[k] for k in keys} for r in cp["results"]] == [{k: r[k] for k in keys} for r in one["results"]]
    samples = [[json.loads(x)["prediction"] for x in (root / d / "samples.jsonl").read_text().splitlines()]
               for d in ("niah-one", "niah-cp")]
    assert len(samples[0]) == 8 and samples[1] == samples[0]
    assert len(set(samples[0])) > 1  # the mini model answers differently per prompt: a real comparison
    assert {p.name for p in (root / "niah-cp").iterdir()} == {p.name for p in (root / "niah-one").iterdir()}


def test_recalibration_across_two_ranks_follows_one_process(clis):
    from safetensors.torch import load_file

    root, out = clis
    assert [r["recalibrate"]["rc"] for r in out] == [0, 0]
    logs = [[h for h in json.loads((root / d / "trainer_state.json").read_text())["log_history"] if "loss" in h]
            for d in ("recal-one", "recal-cp")]
    assert [h["step"] for h in logs[1]] == [h["step"] for h in logs[0]] == [1, 2]
    assert logs[0][1]["loss"] < logs[0][0]["loss"] - 0.1  # the step did something
    for a, b in zip(*logs):  # the gradient's norm is W times off if DDP's average were not undone
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                    rel=1e-5)
    one, cp = (load_file(root / d / "model.safetensors") for d in ("recal-one", "recal-cp"))
    assert one.keys() == cp.keys()
    for name in one:
        assert rel_err(cp[name], one[name]) < 1e-6, name
    config = json.loads((root / "recal-cp" / "config.json").read_text())
    assert config["model_type"] == "llama_drope"
