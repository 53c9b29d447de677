"""``drope train-mini``: the generated training data and a 20-step run of the recipe at the tiny size (CPU)."""

import argparse
import json
import re

import pytest
import torch

from drope.demo import corpus, train
from drope.niah import tasks as niah_tasks

L_TRAIN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return corpus.train_tokenizer(1024, seed=0)


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    text = " " + niah_tasks.NEEDLE.format(key="whispering-workhorse", value="1234567")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    digits = [t for t in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digits == list("1234567")
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id


def test_tokenizer_is_seeded():
    a = corpus.train_tokenizer(400, seed=3)
    b = corpus.train_tokenizer(400, seed=3)
    assert a.get_vocab() == b.get_vocab()


NEEDLE_RE = {"number": r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.",
             "word": r"One of the special magic words for ([a-z]+-[a-z]+) is: ([a-z]+)\."}


@pytest.mark.parametrize("seed,value_types", [(0, ("number",)), (5, ("number",)), (0, ("number", "word"))],
                         ids=["seed0", "seed5", "seed0-mixed"])
def test_rows_exact_length_answers_retrievable(tokenizer, seed, value_types):
    sampler = corpus.RowSampler(tokenizer, L_TRAIN, seed=seed, value_types=value_types)
    batch = sampler.batch(0, 24)
    assert batch["input_ids"].shape == (24, L_TRAIN) and batch["answer_mask"].shape == (24, L_TRAIN)
    n_copy = 0
    seen = set()
    for ids, mask in zip(batch["input_ids"].tolist(), batch["answer_mask"].tolist()):
        assert sum(mask) > 0
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if " mentioned in the provided text " not in text:
            # a copy row: every target token repeats the token that followed an earlier copy of its
            # predecessor (what an induction head predicts), and is drawn from the copy alphabet
            n_copy += 1
            for j in range(1, L_TRAIN):
                if mask[j] and mask[j - 1]:
                    assert 3 <= ids[j] < 3 + corpus.COPY_ALPHABET or ids[j] in sampler.copy_words
                    assert any(ids[i - 1] == ids[j - 1] and ids[i] == ids[j] for i in range(1, j - 1))
            continue
        for doc in text.split(corpus.BOS)[1:]:
            if " mentioned in the provided text " not in doc:
                continue  # the copy half of a split row
            # every answered value was planted in a needle of the same document, in the drope.niah format
            # of its value type (one type per document)
            kinds = [v for v in NEEDLE_RE if re.search(NEEDLE_RE[v], doc)]
            assert len(kinds) == 1 and kinds[0] in value_types, doc
            seen.add(kinds[0])
            needles = dict(re.findall(NEEDLE_RE[kinds[0]], doc))
            question, _, answer = doc.rpartition(" mentioned in the provided text ")
            assert needles and answer.startswith(("is ", "are "))
            answered = re.findall(r"\d{7}" if kinds[0] == "number" else r"[a-z]+", answer.split(" ", 1)[1].split(corpus.EOS)[0])
            answered = [a for a in answered if a != "and"]
            assert answered and all(a in needles.values() for a in answered), (answer, needles)
            if kinds[0] == "word":
                assert all(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) == 1 for a in answered)
    assert seen == set(value_types)
    assert 0 < n_copy < 24
    again = corpus.RowSampler(tokenizer, L_TRAIN, seed=seed, value_types=value_types).batch(0, 24)
    assert torch.equal(batch["input_ids"], again["input_ids"])


def test_number_rows_do_not_depend_on_the_value_type_option(tokenizer):
    """Number-only rows are the stream the shipped models before value types were trained on."""
    a = corpus.RowSampler(tokenizer, L_TRAIN, seed=0).batch(0, 6)["input_ids"]
    b = corpus.RowSampler(tokenizer, L_TRAIN, seed=0, value_types=["number", "number"]).batch(0, 6)["input_ids"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="value_types"):
        corpus.RowSampler(tokenizer, L_TRAIN, value_types=("uuid",))
    with pytest.raises(ValueError, match="value_types"):
        corpus.RowSampler(tokenizer, L_TRAIN, value_types=())
    with pytest.raises(ValueError, match="value_types"):
        train.Recipe(value_types=("number", "number"))
    with pytest.raises(ValueError, match="value_types"):
        train.Recipe(value_types=("emoji",))


@pytest.mark.parametrize("value_type", ["number", "word"])
def test_quiz_rows_ask_several_planted_keys(tokenizer, value_type):
    import random

    sampler = corpus.RowSampler(tokenizer, 256, seed=0, value_types=(value_type,))
    kind, value = {"number": ("number", r"\d{7}"), "word": ("word", r"[a-z]+")}[value_type]
    n_questions = set()
    for i in range(12):
        ids, mask = sampler._kv(256, random.Random(i))
        assert len(ids) == len(mask) == 256 and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids)
        needles = dict(re.findall(NEEDLE_RE[value_type], text))
        asked = re.findall(rf"The special magic {kind} for ([a-z]+-[a-z]+) mentioned in the provided text is "
                           rf"({value})\.", text)
        assert asked and len(needles) >= len(asked)
        assert all(needles[k] == v for k, v in asked)
        assert len({k for k, _ in asked}) == len(asked)
        # the weighted targets are exactly the answers (" " + value + "." per question) and EOS
        answers = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert answers == "".join(f" {v}." for _, v in asked) + corpus.EOS
        n_questions.add(len(asked))
    assert max(n_questions) > 1


def test_rows_differ_between_seeds_and_from_eval_prompts(tokenizer):
    a = corpus.RowSampler(tokenizer, L_TRAIN, seed=0).batch(0, 4)["input_ids"]
    b = corpus.RowSampler(tokenizer, L_TRAIN, seed=1).batch(0, 4)["input_ids"]
    assert not torch.equal(a, b)
    builder = niah_tasks.PromptBuilder(tokenizer, chat_template="off")
    evaluation = builder.build("single", L_TRAIN, 0.5, seed=0)
    assert evaluation.answers[0] not in tokenizer.decode(a.flatten())


def test_answer_text_and_bad_inputs(tokenizer):
    assert corpus.answer_text(["1234567"]) == " 1234567."
    assert corpus.answer_text(["1", "2", "3"]) == " 1, 2, and 3."
    with pytest.raises(ValueError, match="values"):
        corpus.answer_text([])
    with pytest.raises(ValueError, match="vocab_size"):
        corpus.train_tokenizer(100)
    with pytest.raises(ValueError, match="length"):
        corpus.RowSampler(tokenizer, 64)


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps"), ({"size": "huge"}, "size"), ({"train_length": 64}, "train_length"),
    ({"recal_fraction": 1.0}, "recal_fraction"), ({"lr": 0.0}, "lr"), ({"answer_weight": -1.0}, "answer_weight"),
    ({"device": "tpu"}, "device"),
], ids=["steps0", "size-huge", "L64", "recal1", "lr0", "answer-weight-neg", "device-tpu"])
def test_recipe_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.Recipe(**kwargs)


def test_weighted_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.long)
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(train.weighted_loss(logits, ids, mask, 5.0).double(), plain)
    mask[:, -2:] = 1
    w = 1 + 5.0 * mask[:, 1:].double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    assert torch.allclose(train.weighted_loss(logits, ids, mask, 5.0).double(), (nll * w.flatten()).sum() / w.sum())


def _args(out, **over):
    d = dict(out=str(out), size="tiny", steps=20, batch=2, train_length=L_TRAIN, lr=3e-3, recal_lr=1e-3,
             recal_fraction=0.2, answer_weight=4.0, vocab_size=1024, fit_factor=2, fit_windows=1, eval_every=10,
             variants="rope,nope,drope", threads=1, seed=0, device="cpu", recal_weight_decay=0.1, recal_beta2=0.95,
             recal_schedule="cosine", recal_preset=None, value_types="number,word", rope_from=None)
    d.update(over)
    return argparse.Namespace(**d)


@pytest.mark.slow
def test_twenty_step_recipe_on_cpu(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert train.run(_args(tmp_path)) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recal_steps"] == 4
    assert manifest["tokens_per_variant"] == 20 * 2 * L_TRAIN
    steps = {v: max(r["step"] for r in manifest["log"] if r["variant"] == v) for v in ("rope", "nope", "drope")}
    assert steps == {"rope": 20, "nope": 20, "drope": 20}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in manifest["log"])
    ids = torch.randint(3, 1024, (1, 2 * L_TRAIN))
    for variant, model_type in (("rope", "llama"), ("nope", "llama_drope"), ("drope", "llama_drope")):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / variant, attn_implementation="sdpa")
        assert model.config.model_type == model_type
        assert AutoTokenizer.from_pretrained(tmp_path / variant).get_vocab() == \
            AutoTokenizer.from_pretrained(tmp_path / "tokenizer").get_vocab()
        assert torch.isfinite(model(input_ids=ids).logits).all()
    drope_cfg = json.loads((tmp_path / "drope" / "config.json").read_text())
    assert drope_cfg["attention_type"] == "qk_norm_nope"
    assert drope_cfg["drope_temperature"]["coef"] == manifest["temperature"]["drope"]["coef"]
    assert json.loads((tmp_path / "nope" / "config.json").read_text())["attention_type"] == "nope"


def test_cli_rejects_unknown_variant(tmp_path, capsys):
    assert train.run(_args(tmp_path, variants="rope,alibi")) == 2
    assert "variants" in capsys.readouterr().err


def test_sakana_recalibration_preset(tmp_path):
    """--recal-preset sakana: SakanaAI's recalibration optimiser (lr 3e-4, wd 0, beta2 0.999, constant)."""
    assert train.run(_args(tmp_path, steps=10, variants="drope", recal_preset="sakana", eval_every=5)) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    r = manifest["recipe"]
    assert (r["recal_lr"], r["recal_weight_decay"], r["recal_beta2"], r["recal_schedule"]) == (3e-4, 0.0, 0.999,
                                                                                             "constant")
    lrs = [row["lr"] for row in manifest["log"] if row["variant"] == "drope"]
    assert lrs[-1] == pytest.approx(3e-4)  # constant after the warm-up, no cosine decay
    assert train._lr_at(50, 100, 1.0, 10, "constant") == 1.0 and train._lr_at(50, 100, 1.0, 10, "cosine") < 1.0
    with pytest.raises(ValueError, match="recal_schedule"):
        train.Recipe(recal_schedule="linear")


@pytest.mark.slow
def test_drope_from_a_kept_rope_snapshot_equals_one_run(tmp_path):
    """--rope-from: a DroPE branch started from an earlier run's RoPE snapshot is the one-process run."""
    one, later = tmp_path / "one", tmp_path / "later"
    assert train.run(_args(one, steps=10, variants="rope,drope", recal_fraction=0.3, eval_every=5)) == 0
    kept = sorted(int(p.stem.split("_")[1]) for p in (one / train.SNAPSHOT_DIR).glob("step_*.pt"))
    assert kept == train.snapshot_steps(train.Recipe(steps=10)) == list(range(1, 10))
    # the snapshots serve without the manifest, which a run still in progress has not written yet
    log_one = json.loads((one / "manifest.json").read_text())["log"]
    (one / "manifest.json").unlink()
    assert train.run(_args(later, steps=10, variants="drope", recal_fraction=0.3, eval_every=5,
                           rope_from=str(one))) == 0
    a = torch.load(one / train.SNAPSHOT_DIR / "step_7.pt")
    from safetensors.torch import load_file

    w_one, w_later = load_file(one / "drope" / "model.safetensors"), load_file(later / "drope" / "model.safetensors")
    assert w_one.keys() == w_later.keys()
    assert all(torch.equal(w_one[k], w_later[k]) for k in w_one)
    # the snapshot is the RoPE model of the one-process run at the cut (step 7 of 10)
    assert not torch.equal(a["model.embed_tokens.weight"], w_one["model.embed_tokens.weight"])
    log_later = json.loads((later / "manifest.json").read_text())["log"]
    assert [r["answer_acc"] for r in log_one if r["variant"] == "drope"] == \
        [r["answer_acc"] for r in log_later if r["variant"] == "drope"]


def test_rope_from_refuses_another_recipe(tmp_path, capsys):
    assert train.run(_args(tmp_path / "one", steps=20, variants="rope", eval_every=5)) == 0
    assert train.run(_args(tmp_path / "b", steps=20, batch=3, variants="drope", rope_from=str(tmp_path / "one"))) == 2
    assert "batch=2 there, 3 here" in capsys.readouterr().err
    assert train.run(_args(tmp_path / "c", steps=20, variants="drope", value_types="number",
                           rope_from=str(tmp_path / "one"))) == 2
    assert "value_types" in capsys.readouterr().err
    assert train.run(_args(tmp_path / "d", steps=20, variants="drope", recal_fraction=0.25,
                           rope_from=str(tmp_path / "one"))) == 2
    # 5 recal steps: the cut at 15 is not a tenth of the run, so no snapshot was kept there
    assert "no RoPE snapshot at step 15" in capsys.readouterr().err
    assert train.run(_args(tmp_path / "e", steps=20, variants="rope,drope", rope_from=str(tmp_path / "one"))) == 2
    assert "drope alone" in capsys.readouterr().err
    assert train.run(_args(tmp_path / "f", steps=20, variants="drope", rope_from=str(tmp_path / "nothing"))) == 2
    assert "holds no RoPE snapshots" in capsys.readouterr().err
