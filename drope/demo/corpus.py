"""Locally generated training data for the mini models: a small BPE tokenizer and token rows.

Everything is generated, nothing is downloaded:

- text: the NIAH haystack essay shipped with :mod:`drope.niah` (generated, digit-free);
- retrieval rows: NIAH prompts built by :class:`drope.niah.PromptBuilder` in the exact needle, question
  and answer format of ``drope niah`` (single, multikey, multiquery, multivalue) followed by the
  answer and EOS; training samples use seeds disjoint from the evaluation seeds; each sample draws
  its value type (7-digit numbers, or words that are one token of the tokenizer) from the sampler's
  ``value_types``;
- key-value quiz rows: up to eight needles (the same sentence format) in a short haystack, then up to
  four of their keys asked one after another, each question followed by its answer;
- copy rows: episodes of 8-24 random tokens, a little haystack, and the same tokens again (with word
  values, half the episodes are made of the value words' tokens, the tokens a word answer copies).

The tokenizer is a byte-level BPE trained on that text with digits split one per token, so a
7-digit value is always 7 tokens and can be copied digit by digit.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import niah

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# training seeds live far from the evaluation seed (0 by default in drope niah / drope demo)
TRAIN_SEED_OFFSET = 1_000_003
# RowSampler rows of seed ``seed + HELD_OUT_SEED_OFFSET`` are held out from training (seed ``seed``):
# the temperature fit's stream and the training probe read them
HELD_OUT_SEED_OFFSET = 7919
# row kinds and their share of the training rows:
# - "copy" rows (random-token copy episodes) are an induction-head curriculum; without them, or with
#   copy rows made of haystack text (which the model memorises instead of copying), none of our runs
#   learned to copy at all, let alone retrieve (CONTRIBUTING.md, "The mini-model recipe");
# - "kv" rows are quizzes: up to KV_NEEDLES needles, then up to KV_QUESTIONS of their keys asked in turn.
MIX = (("single", 0.15), ("multikey", 0.15), ("multiquery", 0.1), ("multivalue", 0.1), ("kv", 0.1), ("copy", 0.4))
KV_NEEDLES = 8
KV_QUESTIONS = 4
# copy episodes draw their tokens from ids 3 .. 3 + COPY_ALPHABET - 1 (byte tokens): a small alphabet
# makes the induction head form within the CPU budget (with the full vocabulary it did not)
COPY_ALPHABET = 64
# value types a training row can carry: uuids are 36 characters, too long for L_train = 256 rows with
# four needles
TRAIN_VALUE_TYPES = ("number", "word")


def check_value_types(value_types: Sequence[str], *, repeats: bool = True) -> Tuple[str, ...]:
    """``value_types`` as a tuple without repeats; raises ValueError unless it is a non-empty subset of
    :data:`TRAIN_VALUE_TYPES` (and, with ``repeats=False``, lists each type once)."""
    unique = tuple(dict.fromkeys(value_types))
    if not unique or any(v not in TRAIN_VALUE_TYPES for v in unique) or (not repeats and len(unique) != len(value_types)):
        raise ValueError(f"value_types must be a non-empty subset of {', '.join(TRAIN_VALUE_TYPES)}"
                         f"{'' if repeats else ', each once'}, got {list(value_types)}")
    return unique


def _random_key(rng: random.Random) -> str:
    return f"{rng.choice(niah.KEY_ADJECTIVES)}-{rng.choice(niah.KEY_NOUNS)}"


def _value(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _dummy_values(builder, n: int) -> List[str]:
    """``n`` values of ``builder``'s type whose token count is that of any value of that type."""
    return ["1000000"] * n if builder.value_type == "number" else builder.value_words[:n]


def answer_text(values: Sequence[str]) -> str:
    """The completion a model is trained to produce after the NIAH answer prefix.

    Args:
        values: the expected values in order.

    Returns:
        ``" 1234567."`` for one value, ``" 1234567, 2345678, and 3456789."`` for several.

    Raises:
        ValueError: if ``values`` is empty.
    """
    if not values:
        raise ValueError("values must contain at least one value")
    return " " + niah.join_keys(list(values)) + "."


def tokenizer_text(seed: int = 0, n_lines: int = 3000) -> List[str]:
    """Lines of text the BPE is trained on: essay sentences, needles, questions and answers."""
    rng = random.Random(f"tokenizer|{seed}")
    lines = list(niah.load_haystack("essay"))
    # the fixed instructions are frequent in the data, so let the BPE merge them
    lines += [niah.INTRO] * 200
    for _ in range(n_lines):
        keys = [_random_key(rng) for _ in range(2)]
        lines.append(niah.NEEDLE.format(key=keys[0], value=_value(rng)))
        lines.append(niah.QUESTION_ONE.format(key=keys[0]) + "\n" + niah.ANSWER_ONE.format(key=keys[0]))
        lines.append(niah.QUESTION_ALL.format(key=keys[1]) + "\n" + niah.ANSWER_ALL.format(key=keys[1])
                     + answer_text([_value(rng) for _ in range(3)]))
    return lines


def train_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Train the byte-level BPE (digits one per token) and wrap it for transformers.

    Args:
        vocab_size: BPE vocabulary size including the 256 byte tokens and the 3 special tokens.
        seed: seed of the generated training text.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` that prepends ``<s>`` and has ``</s>`` as EOS.

    Raises:
        ValueError: if ``vocab_size`` is below 300.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + specials + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_text(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20)


class RowSampler:
    """Seeded training rows of exactly ``length`` tokens (retrieval samples, answers, EOS).

    Args:
        tokenizer: the tokenizer of :func:`train_tokenizer`.
        length: row length (L_train).
        seed: seed; row ``i`` depends only on (seed, i), so any worker order gives the same data.
        value_types: the NIAH value types retrieval and quiz samples draw from (uniformly, one type
            per sample): ``"number"`` (7 digits, what the paper's NIAH uses) and/or ``"word"`` (one
            token of ``tokenizer``, the words ``drope niah --value-type word`` asks for).

    Raises:
        ValueError: a ``length`` below 128, an empty ``value_types`` or one that is not number or
            word, or ``"word"`` with a tokenizer that has too few single-token words.
    """

    def __init__(self, tokenizer, length: int = 256, seed: int = 0, value_types: Sequence[str] = ("number",)):
        if not isinstance(length, int) or length < 128:
            raise ValueError(f"length must be an int >= 128 (room for 4 needles and the question), got {length!r}")
        value_types = check_value_types(value_types)
        self.tokenizer = tokenizer
        self.length = length
        self.seed = seed
        self.value_types = value_types
        # one builder per value type; the number builder also serves the copy rows' haystack
        self.builders = {v: niah.PromptBuilder(tokenizer, haystack="essay", chat_template="off", value_type=v)
                         for v in dict.fromkeys(("number",) + value_types)}
        self.builder = self.builders["number"]
        # with word values, half the copy episodes are drawn from the value words' token ids
        self.copy_words = ([self._encode(" " + w)[0] for w in self.builders["word"].value_words]
                           if "word" in value_types else [])
        self.eos = tokenizer.eos_token_id
        self._kinds = [k for k, _ in MIX]
        self._weights = [w for _, w in MIX]

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _value_builder(self, rng: random.Random):
        if len(self.value_types) == 1:
            return self.builders[self.value_types[0]]  # the number-only stream draws no extra random number
        return self.builders[rng.choice(self.value_types)]

    def _niah(self, task: str, length: int, rng: random.Random, index: int) -> Tuple[List[int], List[int]]:
        # digits are one token each and value words one token, so the answer's token count depends only
        # on how many values it has
        builder = self._value_builder(rng)
        n_values = 1 if task in ("single", "multikey") else niah.NUM_NEEDLES
        n_ans = len(self._encode(answer_text(_dummy_values(builder, n_values)))) + 1
        sample = builder.build(task, length - n_ans, rng.random(), seed=TRAIN_SEED_OFFSET + self.seed, trial=index)
        ans = self._encode(answer_text(sample.answers)) + [self.eos]
        if len(ans) != n_ans:
            raise ValueError(f"the tokenizer does not split {builder.value_type} values into a fixed number of "
                             f"tokens (answer of {len(ans)} tokens, expected {n_ans})")
        return sample.input_ids + ans, [0] * len(sample.input_ids) + [1] * len(ans)

    def _kv(self, length: int, rng: random.Random) -> Tuple[List[int], List[int]]:
        """A quiz: up to ``KV_NEEDLES`` needles in a short haystack, then up to ``KV_QUESTIONS`` of their
        keys asked one after another, each question followed by its answer (the lookups are the targets)."""
        builder = self._value_builder(rng)
        text = builder.text
        keys: List[str] = []
        while len(keys) < KV_NEEDLES:
            k = _random_key(rng)
            if k.split("-")[0] not in {x.split("-")[0] for x in keys} and k.split("-")[1] not in {x.split("-")[1] for x in keys}:
                keys.append(k)
        taken: set = set()
        # numbers keep the number-only release's stream (drawn without the distinctness retry)
        values = [_value(rng) if builder.value_type == "number" else builder._value(rng, taken) for _ in keys]
        head = builder.special_prefix + self._encode(text["INTRO"])
        needles = [self._encode(" " + text["NEEDLE"].format(key=k, value=v)) for k, v in zip(keys, values)]

        def qa(i: int) -> Tuple[List[int], List[int]]:
            q = self._encode("\n" + text["QUESTION_ONE"].format(key=keys[i]) + "\n"
                             + text["ANSWER_ONE"].format(key=keys[i]))
            a = self._encode(answer_text([values[i]]))
            return q + a, [0] * len(q) + [1] * len(a)

        n_q = min(rng.randint(1, KV_QUESTIONS), len(needles))
        while True:
            # the asked keys are the first n_q needles (needles are shuffled into the haystack below)
            tail = [qa(i) for i in range(n_q)]
            used = len(head) + sum(map(len, needles)) + sum(len(t[0]) for t in tail) + 1
            if used <= length:
                break
            # too long: drop a needle that is not asked (down to 3), then a question, then needles
            if len(needles) > max(n_q, 3):
                needles.pop()
            elif n_q > 1:
                n_q -= 1
            elif len(needles) > 1:
                needles.pop()
            else:
                raise ValueError(f"length {length} is too short for a key-value row")
        rng.shuffle(tail)
        budget = length - used
        sents = self.builder._sentence_ids
        filler: List[List[int]] = []
        i = rng.randrange(len(sents))
        while budget > 0:
            piece = sents[i % len(sents)][:budget]
            filler.append(piece)
            budget -= len(piece)
            i += 1
        pieces = needles + filler
        rng.shuffle(pieces)
        ids = head + [t for p in pieces for t in p]
        mask = [0] * len(ids)
        for q_ids, q_mask in tail:
            ids += q_ids
            mask += q_mask
        return ids + [self.eos], mask + [1]

    def _copy(self, length: int, rng: random.Random) -> Tuple[List[int], List[int]]:
        """Copy episodes back to back: X (8-24 random ids of a ``COPY_ALPHABET``-token alphabet, or with
        word values half the time of the value words' ids), 0-24 haystack tokens, X again; the repeated
        X is the target.

        X cannot be memorised, so the only way to predict its repeat is to find the earlier occurrence
        of the current token and copy what followed it: an induction head, the mechanism every
        retrieval task builds on.
        """
        ids = list(self.builder.special_prefix)
        mask = [0] * len(ids)
        sents = self.builder._sentence_ids
        while len(ids) < length:
            if self.copy_words and rng.random() < 0.5:
                # the value words' own ids: retrieving a word value copies one of these tokens
                x = [rng.choice(self.copy_words) for _ in range(rng.randint(8, 24))]
            else:
                x = [rng.randrange(3, 3 + COPY_ALPHABET) for _ in range(rng.randint(8, 24))]
            gap: List[int] = []
            n_gap = rng.randint(0, 24)
            while len(gap) < n_gap:
                gap += sents[rng.randrange(len(sents))]
            gap = gap[:n_gap]
            ids += x + gap + x
            mask += [0] * (len(x) + len(gap)) + [1] * len(x)
        return ids[:length], mask[:length]

    def row(self, index: int) -> Tuple[List[int], List[int]]:
        """Row ``index``: ``(input_ids, answer_mask)``, each exactly ``length`` long.

        A row holds one sample of the full length, or (half the time) two samples splitting it, so
        questions and needles are seen at many positions. ``answer_mask`` is 1 on answer tokens and EOS.
        """
        rng = random.Random(f"row|{self.seed}|{index}")
        if rng.random() < 0.5:
            lengths = [self.length]
        else:
            cut = rng.randint(self.length // 2 - self.length // 16, self.length // 2 + self.length // 16)
            lengths = [cut, self.length - cut]
        try:
            return self._row(index, rng, lengths)
        except ValueError:
            # parts too short for this tokenizer (small L_train): one single-needle sample instead
            return self._niah("single", self.length, rng, index * 2)

    def _row(self, index: int, rng: random.Random, lengths: List[int]) -> Tuple[List[int], List[int]]:
        ids: List[int] = []
        mask: List[int] = []
        for j, n in enumerate(lengths):
            kind = rng.choices(self._kinds, self._weights)[0]
            if len(lengths) > 1 and kind in ("multiquery", "multivalue"):
                kind = rng.choice(("single", "multikey", "kv"))
            try:
                if kind == "copy":
                    a, m = self._copy(n, rng)
                elif kind == "kv":
                    a, m = self._kv(n, rng)
                else:
                    a, m = self._niah(kind, n, rng, index * 2 + j)
            except ValueError:
                a, m = self._niah("single", n, rng, index * 2 + j)
            ids += a
            mask += m
        assert len(ids) == self.length, (len(ids), self.length)
        return ids, mask

    def batch(self, start: int, size: int) -> Dict[str, torch.Tensor]:
        """Rows ``start .. start+size-1`` as ``{"input_ids", "answer_mask"}`` (long tensors (size, length))."""
        rows = [self.row(i) for i in range(start, start + size)]
        return {"input_ids": torch.tensor([r[0] for r in rows], dtype=torch.long),
                "answer_mask": torch.tensor([r[1] for r in rows], dtype=torch.long)}


def held_out_stream(tokenizer, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Held-out retrieval text (rows of seed ``seed + HELD_OUT_SEED_OFFSET``, disjoint from training) as one stream,
    for fitting the temperature at a target length.

    Args:
        tokenizer: the tokenizer.
        n_tokens: how many tokens (at least).
        seed: the training seed.

    Returns:
        A 1-D long tensor of at least ``n_tokens`` ids.
    """
    sampler = RowSampler(tokenizer, length=256, seed=seed + HELD_OUT_SEED_OFFSET)
    out: List[int] = []
    i = 0
    while len(out) < n_tokens:
        out += sampler.row(i)[0]
        i += 1
    return torch.tensor(out, dtype=torch.long)


# held-out document sets of niah_stream: "fit" (the temperature fit) and "eval" (the demo's perplexity)
SPLITS = {"fit": 104729, "eval": 130363}


def niah_stream(tokenizer, target_length: int, n_windows: int, seed: int = 0,
                tasks: Optional[Sequence[str]] = None, split: str = "fit") -> torch.Tensor:
    """Held-out NIAH prompts of exactly ``target_length`` tokens with their answers, (n_windows, target_length).

    The temperature is fitted on the ``"fit"`` split (long-context retrieval text of the target length);
    ``drope demo`` measures perplexity on the disjoint ``"eval"`` split.

    Raises:
        ValueError: an unknown ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    tasks = list(tasks or niah.TASKS)
    builder = niah.PromptBuilder(tokenizer, haystack="essay", chat_template="off")
    rows = []
    for i in range(n_windows):
        task = tasks[i % len(tasks)]
        rng = random.Random(f"{split}|{seed}|{i}")
        n_values = 1 if task in ("single", "multikey") else niah.NUM_NEEDLES
        n_ans = len(tokenizer(answer_text(["1000000"] * n_values), add_special_tokens=False)["input_ids"]) + 1
        s = builder.build(task, target_length - n_ans, rng.random(), seed=TRAIN_SEED_OFFSET + seed + SPLITS[split],
                          trial=i)
        ans = list(tokenizer(answer_text(s.answers), add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        rows.append(s.input_ids + ans)
    return torch.tensor(rows, dtype=torch.long)
