"""NIAH generator and scoring: exact token lengths, needles at their depths, parseable answers, seeds."""

import re

import pytest

from drope.niah import haystack, tasks
from drope.niah.tasks import NEEDLE, TASKS, PromptBuilder, parse_depths, parse_lengths, parse_numbers, parse_tasks, score
from niah_helpers import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def builder(tok):
    return PromptBuilder(tok)


@pytest.fixture(scope="module")
def chat_builder():
    return PromptBuilder(train_tokenizer(chat=True))


CASES = [(t, n, d) for t in TASKS for n in (256, 333, 1024) for d in (0.0, 0.3, 1.0)]


@pytest.mark.parametrize("task,length,depth", CASES, ids=[f"{t}-L{n}-d{d:g}" for t, n, d in CASES])
def test_exact_length_needles_at_depth(builder, tok, task, length, depth):
    s = builder.build(task, length, depth, seed=3, trial=1)
    assert len(s.input_ids) == length == s.length
    assert s.input_ids[0] == tok.bos_token_id
    n_needles = 1 if task == "single" else tasks.NUM_NEEDLES
    assert len(s.needles) == n_needles
    longest = max(len(ids) for ids in builder._sentence_ids)
    head = s.meta["head_tokens"]
    for i, n in enumerate(s.needles):
        ids = builder._encode(" " + NEEDLE.format(key=n.key, value=n.value))
        assert s.input_ids[n.token_index:n.token_index + n.num_tokens] == ids
        # needle start, counted in haystack tokens (other needles before it removed)
        before = sum(m.num_tokens for m in s.needles if m.token_index < n.token_index)
        hay_pos = n.token_index - head - before
        assert abs(hay_pos - n.depth * s.haystack_tokens) <= longest, (i, hay_pos, n.depth, s.haystack_tokens)
    assert s.needles[0].depth == depth
    # the asked needle(s) and the expected answers agree
    assert s.answers == ([s.needles[0].value] if task in ("single", "multikey") else [n.value for n in s.needles])
    assert all(re.fullmatch(r"\d{7}", a) for a in s.answers) and len(set(s.answers)) == len(s.answers)


@pytest.mark.parametrize("task", TASKS)
def test_answers_parseable_from_prompt(builder, tok, task):
    s = builder.build(task, 512, 0.5)
    text = tok.decode(s.input_ids, skip_special_tokens=True)
    numbers = parse_numbers(text)
    # every value appears exactly once, and the haystack adds no numbers of its own
    assert sorted(numbers) == sorted(n.value for n in s.needles)
    for key in s.query_keys:
        # in its needle(s), the question and the answer prefix
        assert text.count(key) == (2 + (tasks.NUM_NEEDLES if task == "multivalue" else 1))
    assert text.rstrip().endswith("mentioned in the provided text " + ("are" if task in ("multiquery", "multivalue") else "is"))
    if task == "multikey":
        assert len({n.key for n in s.needles}) == tasks.NUM_NEEDLES and s.query_keys == [s.needles[0].key]
    if task == "multivalue":
        assert {n.key for n in s.needles} == set(s.query_keys)


def test_seeded_and_reproducible(builder):
    a = builder.build("multiquery", 700, 0.25, seed=1, trial=2)
    b = builder.build("multiquery", 700, 0.25, seed=1, trial=2)
    assert a.input_ids == b.input_ids and a.answers == b.answers
    assert builder.build("multiquery", 700, 0.25, seed=1, trial=3).input_ids != a.input_ids
    assert builder.build("multiquery", 700, 0.25, seed=2, trial=2).answers != a.answers


def test_chat_template_and_noise_haystack(chat_builder, tok):
    s = chat_builder.build("single", 300, 0.5)
    assert len(s.input_ids) == 300 and s.meta["chat_template"]
    text = chat_builder.tokenizer.decode(s.input_ids)
    assert text.startswith("<s><|user|>\n") and "<|end|>\n<|assistant|>\nThe special magic number" in text
    noise = PromptBuilder(tok, haystack="noise", chat_template="off")
    s = noise.build("multivalue", 400, 0.0)
    text = tok.decode(s.input_ids, skip_special_tokens=True)
    assert len(s.input_ids) == 400 and "The grass is green. The sky is blue." in text


def test_long_prompt_is_exact(builder):
    s = builder.build("multikey", 32 * 1024, 0.9)
    assert len(s.input_ids) == 32 * 1024
    assert s.needles[0].token_index > 0.85 * 32 * 1024


def test_builder_bad_input(builder, tok):
    with pytest.raises(ValueError, match="task must be one of"):
        builder.build("needle", 256, 0.5)
    with pytest.raises(ValueError, match="depth must be"):
        builder.build("single", 256, 1.5)
    with pytest.raises(ValueError, match="length must be a positive int"):
        builder.build("single", 0, 0.5)
    with pytest.raises(ValueError, match="too short for task 'multiquery'"):
        builder.build("multiquery", 64, 0.5)
    with pytest.raises(ValueError, match="chat_template must be"):
        PromptBuilder(tok, chat_template="yes")
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder(tok, chat_template="on")


@pytest.mark.parametrize("pred,answers,expected", [
    (" 1234567.", ["1234567"], (1.0, 1.0)),
    ("The number is 12345678", ["1234567"], (0.0, 0.0)),
    ("1234567, 7654321 and 1111111", ["1234567", "7654321", "2222222", "1111111"], (0.0, 0.75)),
    ("2222222 1111111 7654321 1234567", ["1234567", "7654321", "2222222", "1111111"], (1.0, 1.0)),
    ("no digits", ["1234567"], (0.0, 0.0)),
], ids=["exact", "longer-number", "partial", "all-any-order", "none"])
def test_score(pred, answers, expected):
    assert score(pred, answers) == expected


def test_score_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        score("1234567", [])


def test_parsers():
    assert parse_lengths("4k, 128,8K,4096") == [128, 4096, 8192]
    assert parse_lengths("128k") == [131072]
    assert parse_tasks("all") == list(TASKS) and parse_tasks("multikey,single") == ["multikey", "single"]
    assert parse_depths("5") == [0.0, 0.25, 0.5, 0.75, 1.0] and parse_depths("1") == [0.5]
    assert parse_depths("0%,50%,100%") == [0.0, 0.5, 1.0] and parse_depths("0.1,0") == [0.0, 0.1]
    for bad, fn in [("4q", parse_lengths), ("0", parse_lengths), ("single,haystack", parse_tasks),
                    ("0", parse_depths), ("1.5", parse_depths), ("x", parse_depths)]:
        with pytest.raises(ValueError):
            fn(bad)


def test_shipped_haystack_is_reproducible_and_clean(tmp_path):
    text = haystack.ESSAY_PATH.read_text(encoding="utf-8")
    assert text == haystack.generate_essay()
    assert haystack.ESSAY_PATH.stat().st_size < 300_000
    assert not re.search(r"\d", text) and "magic" not in text
    assert len(haystack.load_haystack("essay")) > 1000
    bad = tmp_path / "bad.txt"
    bad.write_text("The code is 1234567. Nothing else.")
    with pytest.raises(ValueError, match="7-digit"):
        haystack.load_haystack(bad)
    with pytest.raises(ValueError, match="essay, noise"):
        haystack.load_haystack(str(tmp_path / "missing.txt"))
    good = tmp_path / "good.txt"
    good.write_text("One sentence. Another one!  A third?")
    assert haystack.load_haystack(good) == ["One sentence.", "Another one!", "A third?"]


@pytest.mark.parametrize("value_type", ["word", "uuid"])
@pytest.mark.parametrize("task", TASKS)
def test_value_types(tok, value_type, task):
    """RULER's value types: the prompt names them, values are fresh, words are one token, answers score."""
    b = PromptBuilder(tok, chat_template="off", value_type=value_type)
    s = b.build(task, 400, 0.5, seed=3)
    assert len(s.input_ids) == 400 and s.meta["value_type"] == value_type
    text = tok.decode(s.input_ids)
    assert f"special magic {value_type}s for" in text and "numbers" not in text
    values = [n.value for n in s.needles]
    assert len(set(values)) == len(values)
    for n in s.needles:
        assert n.value in text
        if value_type == "word":
            assert len(tok(" " + n.value, add_special_tokens=False)["input_ids"]) == 1
            assert n.value not in tasks.KEY_ADJECTIVES + tasks.KEY_NOUNS
        else:
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", n.value)
    assert score(" and ".join(s.answers).upper(), s.answers, value_type)[0] == 1.0
    assert score("nothing here", s.answers, value_type) == (0.0, 0.0)


def test_number_prompts_are_unchanged_by_value_types(builder):
    """The default keeps the original wording and number stream (the shipped models were trained on it)."""
    assert NEEDLE == "One of the special magic numbers for {key} is: {value}."
    s = builder.build("multikey", 300, 0.25, seed=5)
    again = PromptBuilder(builder.tokenizer, chat_template="off", value_type="number").build("multikey", 300, 0.25,
                                                                                            seed=5)
    assert s.input_ids == again.input_ids and all(a.isdigit() and len(a) == 7 for a in s.answers)


def test_word_score_is_whole_words_and_value_type_checked(tok):
    assert score("the baker's gardener", ["garden"], "word") == (0.0, 0.0)
    assert score("Garden!", ["garden"], "word") == (1.0, 1.0)
    # babble that happens to contain the word later does not score; a listed answer does
    assert score("easy to underestimate how much about the garden", ["garden"], "word") == (0.0, 0.0)
    assert score(" baker, sailor, and potter.", ["potter", "baker", "sailor"], "word") == (1.0, 1.0)
    with pytest.raises(ValueError, match="value_type"):
        PromptBuilder(tok, value_type="emoji")
    with pytest.raises(ValueError, match="value_type"):
        score("1", ["1"], "emoji")
