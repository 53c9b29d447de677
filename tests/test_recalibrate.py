"""Recalibration with the HF Trainer on a tiny Llama (hidden 64, 2 layers) and local data, on CPU."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import drope
from drope import cli, data
from drope.hf.recalibrate import RecalibrateConfig, recalibrate
from test_data import random_text, tiny_tokenizer

SEQ_LEN = 32
# small enough for a contended CPU: every run is a handful of optimizer steps of 4 x 32 tokens
TRAIN = dict(seq_len=SEQ_LEN, batch_size=4, logging_steps=2, show_progress=False, seed=0)


def tiny_llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny RoPE Llama with its tokenizer, and a folder of .txt plus a .jsonl of training text."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("recal")
    rng = random.Random(1)
    texts = [random_text(rng, 12) for _ in range(48)]
    tokenizer = tiny_tokenizer(texts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data").mkdir()
    for i, t in enumerate(texts[:40]):
        (root / "data" / f"{i:02d}.txt").write_text(t)
    (root / "data" / "more.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[40:]))
    (root / "heldout.txt").write_text(" ".join(random_text(rng, 40) for _ in range(2)))
    return root


@pytest.fixture(scope="module")
def trained(workdir):
    """One recalibration of 8 steps with a checkpoint every 4."""
    result = recalibrate(workdir / "model", workdir / "data", workdir / "A", max_steps=8, save_steps=4, **TRAIN)
    return workdir, result


def heldout_loss(model, workdir, tokenizer):
    ids = data.chunk_documents(data.load_documents(workdir / "heldout.txt", tokenizer), SEQ_LEN).long()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_recalibration_converts_lowers_loss_and_saves_a_drope_model(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, result = trained
    assert result.converted and result.global_step == 8 and result.seq_len == SEQ_LEN
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.3, losses
    out = workdir / "A"
    assert (out / "checkpoint-4").is_dir() and (out / "checkpoint-8").is_dir()
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(workdir / "model").get_vocab()
    saved = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert saved.config.model_type == "llama_drope"
    assert saved.config.use_cache
    attn = saved.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (4 * 16,) and attn.k_norm.weight.shape == (2 * 16,)
    base = drope.to_drope(AutoModelForCausalLM.from_pretrained(workdir / "model", attn_implementation="eager"),
                          qk_norm="full")
    assert heldout_loss(saved, workdir, tokenizer) < heldout_loss(base, workdir, tokenizer) - 0.3


def test_resume_from_a_checkpoint_reproduces_the_run(trained, tmp_path):
    workdir, first = trained
    shutil.copytree(workdir / "A" / "checkpoint-4", tmp_path / "checkpoint-4")
    resumed = recalibrate(workdir / "model", workdir / "data", tmp_path, max_steps=8, save_steps=4, resume=True,
                          **TRAIN)
    assert resumed.global_step == 8
    logged = [h["step"] for h in resumed.log_history if "loss" in h]
    assert logged == [2, 4, 6, 8]
    a, b = load_file(workdir / "A" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packed_documents_train_through_cu_seqlens(workdir, tmp_path):
    from transformers import AutoTokenizer

    result = recalibrate(workdir / "model", workdir / "data", tmp_path, max_steps=4, save_steps=100, packed=True,
                         **TRAIN)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert result.global_step == 4 and losses[-1] < losses[0]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    assert result.examples == len(data.pack_documents(data.load_documents(workdir / "data", tokenizer), SEQ_LEN))


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("drope_triton", marks=pytest.mark.interpreter)])
def test_packed_batch_equals_separate_documents(workdir, attn):
    """What training sees with packing: no attention across document borders.

    As in training, no cache: transformers derives the block-diagonal mask of eager/SDPA from the
    restarting position_ids only when there is no cache; "drope_triton" reads cu_seq_lens_q/k.
    """
    from transformers import AutoModelForCausalLM

    model = drope.to_drope(AutoModelForCausalLM.from_pretrained(workdir / "model", attn_implementation=attn),
                           qk_norm="full").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    docs = [torch.randint(4, model.config.vocab_size, (n,)) for n in (7, 13, 5)]
    batch = data.PackedCollator()([{"documents": docs}])
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_a_drope_model_is_trained_as_it_is(workdir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    temperature = {"mode": "position", "coef": 0.2, "train_length": 24}
    model = drope.to_drope(AutoModelForCausalLM.from_pretrained(workdir / "model"), qk_norm="head",
                           temperature=temperature)
    model.save_pretrained(tmp_path / "drope")
    AutoTokenizer.from_pretrained(workdir / "model").save_pretrained(tmp_path / "drope")
    result = recalibrate(tmp_path / "drope", workdir / "data", tmp_path / "out", max_steps=2, save_steps=100, **TRAIN)
    assert not result.converted and result.seq_len == SEQ_LEN
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama_drope" and cfg["qk_norm_type"] == "head"
    assert cfg["drope_temperature"] == temperature
    # without seq_len, the training length is the one the temperature names
    again = recalibrate(tmp_path / "drope", workdir / "data", tmp_path / "out2", max_steps=1, save_steps=100,
                        **{k: v for k, v in TRAIN.items() if k != "seq_len"})
    assert again.seq_len == 24


def test_settings_as_a_config_or_as_keywords(workdir, tmp_path):
    """A RecalibrateConfig and its fields as keywords make the same run; keywords override the config's."""
    config = RecalibrateConfig(max_steps=1, save_steps=100, **TRAIN)
    a = recalibrate(workdir / "model", workdir / "data", tmp_path / "a", config)
    b = recalibrate(workdir / "model", workdir / "data", tmp_path / "b", max_steps=1, save_steps=100, **TRAIN)
    assert (a.global_step, a.examples, a.train_loss) == (b.global_step, b.examples, b.train_loss)
    assert a.global_step == 1
    assert recalibrate(workdir / "model", workdir / "data", tmp_path / "c", config, max_steps=2).global_step == 2
    assert config.max_steps == 1
    with pytest.raises(TypeError, match="learning_rat"):
        recalibrate(workdir / "model", workdir / "data", tmp_path / "d", config, learning_rat=1e-3)
    with pytest.raises(ValueError, match=r"training_args has field\(s\) \['nope'\]"):
        RecalibrateConfig(training_args={"nope": 1})
    assert drope.RecalibrateConfig is RecalibrateConfig


def test_cli_end_to_end(workdir, tmp_path, capsys):
    np.save(tmp_path / "tokens.npy", np.random.default_rng().integers(4, 90, size=(20, 40)))
    rc = cli.main(["recalibrate", str(workdir / "model"), str(tmp_path / "tokens.npy"), str(workdir / "heldout.txt"),
                   "-o", str(tmp_path / "out"), "--max-steps", "3", "--save-steps", "2", "--batch-size", "2",
                   "--seq-len", "16", "--warmup", "1", "--no-progress", "--qk-norm", "head",
                   "--trainer-arg", "lr_scheduler_type=constant_with_warmup", "--trainer-arg", "save_total_limit=1"])
    assert rc == 0
    assert "model saved to" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama_drope"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3"]  # save_total_limit=1
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert args.lr_scheduler_type == "constant_with_warmup" and (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert cfg["drope_temperature"] == {"mode": "none", "coef": 0.0, "train_length": 16}
    rc = cli.main(["recalibrate", str(workdir / "model"), str(tmp_path / "tokens.npy"), "-o", str(tmp_path / "out"),
                   "--max-steps", "4", "--save-steps", "2", "--batch-size", "2", "--seq-len", "16", "--resume",
                   "--no-progress"])
    assert rc == 0
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    rc = cli.main(["recalibrate", str(workdir / "model"), str(tmp_path / "tokens.npy"), "-o", str(tmp_path / "x"),
                   "--trainer-arg", "no_such_field=1"])
    assert rc == 2
    assert "no_such_field" in capsys.readouterr().err
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["qk_norm_type"] == "head"
    rc = cli.main(["recalibrate", str(workdir / "model"), str(tmp_path / "tokens.npy"), "-o", str(tmp_path / "out"),
                   "--max-steps", "6", "--seq-len", "16", "--resume", "--qk-norm", "full", "--no-progress"])
    assert rc == 2
    assert "was trained with qk_norm='head'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no-model", "no-config", "no-tokenizer", "no-data", "unknown-type", "no-checkpoint",
                                  "bad-qk-norm", "out-of-vocab", "seq-len"])
def test_bad_input(workdir, tmp_path, case, capsys):
    model, files, kw = workdir / "model", [workdir / "data"], {}
    if case == "no-model":
        model, match = tmp_path / "missing", "does not exist"
    elif case == "no-config":
        (tmp_path / "m").mkdir()
        model, match = tmp_path / "m", "no config.json"
    elif case == "no-tokenizer":
        shutil.copytree(workdir / "model", tmp_path / "m", ignore=shutil.ignore_patterns("tokenizer*", "special*"))
        model, match = tmp_path / "m", "tokenizer"
    elif case == "no-data":
        (tmp_path / "empty").mkdir()
        files, match = [tmp_path / "empty"], "no data files"
    elif case == "unknown-type":
        (tmp_path / "d.parquet").write_bytes(b"x")
        files, match = [tmp_path / "d.parquet"], "unsupported type '.parquet'"
    elif case == "no-checkpoint":
        kw, match = {"resume": True}, "no checkpoint"
    elif case == "bad-qk-norm":
        kw, match = {"qk_norm": "layer"}, "qk_norm must be None or one of"
    elif case == "seq-len":
        kw, match = {"seq_len": 1}, "seq_len must be None or an int >= 2"
    else:
        np.save(tmp_path / "x.npy", np.array([1, 2, 10_000]))
        files, match = [tmp_path / "x.npy"], "outside the model's vocabulary"
    with pytest.raises(ValueError, match=match):
        recalibrate(model, files, tmp_path / "out", max_steps=1, **{**TRAIN, **kw})
    if case in ("no-model", "unknown-type"):
        rc = cli.main(["recalibrate", str(model), *map(str, files), "-o", str(tmp_path / "out")])
        assert rc == 2
        assert match in capsys.readouterr().err


@pytest.mark.interpreter
def test_recalibrate_through_the_triton_kernel(workdir, tmp_path):
    """Training through the kernel's backward (with gradient checkpointing and packed cu_seqlens).

    One packed step each way: same weights, same batch -> same loss and gradient norm as SDPA.
    """
    kw = dict(TRAIN, logging_steps=1)
    ours = recalibrate(workdir / "model", workdir / "data", tmp_path / "triton", max_steps=1, save_steps=100,
                       packed=True, attn_implementation="drope_triton", **kw)
    ref = recalibrate(workdir / "model", workdir / "data", tmp_path / "sdpa", max_steps=1, save_steps=100,
                      packed=True, attn_implementation="sdpa", **kw)
    (a,), (b,) = ([h for h in r.log_history if "loss" in h] for r in (ours, ref))
    assert np.isfinite(a["loss"]) and np.isfinite(a["grad_norm"])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


@pytest.mark.gpu
def test_recalibrate_on_gpu_bf16_through_the_kernel(workdir, tmp_path):
    """The GPU defaults: "drope_triton" attention, bf16 mixed precision, packed documents via cu_seqlens."""
    from transformers import AutoModelForCausalLM

    result = recalibrate(workdir / "model", workdir / "data", tmp_path, max_steps=12, save_steps=6, packed=True,
                         **TRAIN)
    args = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert args.bf16
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
    ids = torch.randint(4, 90, (2, SEQ_LEN), device="cuda")
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="drope_triton").cuda()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").cuda()(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)


def _recalibrate_command(workdir, out, batch_size):
    return ["recalibrate", str(workdir / "model"), str(workdir / "data"), "-o", str(out), "--max-steps", "4",
            "--batch-size", str(batch_size), "--seq-len", str(SEQ_LEN), "--logging-steps", "1", "--save-steps", "100",
            "--warmup", "1", "--no-progress", "--no-gradient-checkpointing"]


def _losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_at_the_same_global_batch(workdir, tmp_path):
    """README's scale-out: `torchrun --nproc_per_node 2 -m drope.cli recalibrate` (DDP over gloo on CPU), 2 x 2
    rows per step, follows the loss curve of one process with 4 rows per step (same data order, averaged
    gradients)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(__import__("pathlib").Path(drope.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "drope.cli", *_recalibrate_command(workdir, tmp_path / "ddp", 2)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert cli.main(_recalibrate_command(workdir, tmp_path / "one", 4)) == 0
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(ddp) == len(one) == 4
    assert ddp[-1] < ddp[0]
    np.testing.assert_allclose(ddp, one, rtol=1e-4)
