"""RULER-style needle-in-a-haystack samples of an exact token length, and their scoring.

Four tasks, as in the DroPE paper's RULER evaluation:

- ``single``: one needle, asked.
- ``multikey``: four needles with different keys, one asked (the others are distractors).
- ``multiquery``: four needles with different keys, all four asked.
- ``multivalue``: one key with four values, all asked.

A needle reads ``One of the special magic numbers for {key} is: {value}.`` with a key like
``whispering-workhorse`` and a value of one of RULER's types: a 7-digit number (the default, what the
DroPE paper's NIAH used), a word that is one token of the model's tokenizer (so finding the needle
is measured apart from copying a multi-token value), or a UUID; the text then says "words" or
"uuids" instead of "numbers". Prompts are built in token space from separately
tokenized pieces (instructions, haystack sentences, needles, question), so the prompt is exactly
``length`` tokens of the model's own tokenizer and needles sit on sentence boundaries. The depth of a
sample is the depth of its first needle (the asked one for ``multikey``); the other needles of
multi-needle tasks go to seeded random depths. Everything derives from a string seed, so a sample
is reproducible and independent of the order in which samples are built.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import uuid

from .haystack import load_haystack

TASKS = ("single", "multikey", "multiquery", "multivalue")
VALUE_TYPES = ("number", "word", "uuid")
# how the prompt names the values of each type (RULER's wording)
_KIND = {"number": ("number", "numbers"), "word": ("word", "words"), "uuid": ("uuid", "uuids")}
# value words: common English nouns and adjectives; a builder keeps those that are one token (with
# a leading space) of its tokenizer, and fills up from the haystack's single-token words if too few
VALUE_WORDS = (
    "apple river stone cloud garden window silver mountain forest candle bridge castle dinner winter "
    "summer yellow purple orange market pocket rabbit tiger monkey guitar piano rocket planet coffee "
    "butter cheese bread water paper letter answer secret story world money music house night light "
    "green black white brown table chair shirt horse bird fish tree flower ocean island desert valley "
    "village city country king queen doctor teacher student friend family mother father sister brother "
    "child animal school office church hospital library museum theater kitchen street road train plane "
    "boat ship truck bicycle engine signal button ticket jacket blanket pillow mirror basket bottle "
    "circle square triangle silver golden copper iron marble crystal shadow thunder rain snow storm "
    "wind fire earth metal glass wood cotton wool leather sugar salt pepper honey lemon cherry grape "
    "melon peach plum carrot potato onion tomato bean corn rice soup salad pizza pasta cookie cake "
    "candy juice milk tea wine beer smoke dust sand mud clay rock hill lake pond beach coast harbor "
    "canal tunnel tower palace temple castle fortress prison factory farm barn field meadow orchard"
).split()
MIN_VALUE_WORDS = 16
# a word answer must stand among the first WORD_WINDOW * len(answers) + 2 words of the prediction
WORD_WINDOW = 3
# never values: words any answer may contain by chance
_FUNCTION_WORDS = frozenset(
    "about above after again against along among anyway because before being below between could "
    "during every first found other their there these thing things those through under until where "
    "which while would often never always maybe still since later quite really rather seems seemed "
    "special magic number numbers mentioned provided text".split())
NUM_NEEDLES = 4
DEFAULT_MAX_NEW_TOKENS = {"single": 32, "multikey": 32, "multiquery": 64, "multivalue": 64}

# templates with the value type's name left open ({kind} / {kinds})
_TEMPLATES = dict(
    NEEDLE="One of the special magic {kinds} for {key} is: {value}.",
    INTRO=("Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
           "I will quiz you about the {kinds} afterwards.\n"),
    QUESTION_ONE="What is the special magic {kind} for {key} mentioned in the provided text?",
    ANSWER_ONE="The special magic {kind} for {key} mentioned in the provided text is",
    QUESTION_ALL="What are all the special magic {kinds} for {key} mentioned in the provided text?",
    ANSWER_ALL="The special magic {kinds} for {key} mentioned in the provided text are",
)


def templates(value_type: str = "number") -> Dict[str, str]:
    """The prompt texts for one value type, with only {key} (and {value}) left to fill."""
    kind, kinds = _KIND[value_type]
    return {name: t.replace("{kinds}", kinds).replace("{kind}", kind) for name, t in _TEMPLATES.items()}


# the number wording (the default, and what the shipped mini models were trained on)
NEEDLE, INTRO, QUESTION_ONE, ANSWER_ONE, QUESTION_ALL, ANSWER_ALL = (
    templates()[n] for n in ("NEEDLE", "INTRO", "QUESTION_ONE", "ANSWER_ONE", "QUESTION_ALL", "ANSWER_ALL"))

_CHAT_MARK = "@@NIAH-CONTENT@@"

# keys are ADJECTIVE-NOUN, e.g. whispering-workhorse
KEY_ADJECTIVES = (
    "whispering silent glowing hungry sleepy brave clumsy fuzzy jolly lucky mighty nimble proud "
    "rapid shiny sneaky swift tiny witty zealous amber bitter calm dusty eager fancy gloomy hollow "
    "icy jagged kind lively mellow noisy odd pale quirky rough scarlet tame upbeat vivid wild "
    "young zany ancient bold crisp daring elegant frosty giant humble"
).split()
KEY_NOUNS = (
    "workhorse badger lantern meadow pebble falcon harbor kettle compass violin walrus pepper "
    "glacier turnip beacon canyon dolphin ember feather goblet hammock igloo jigsaw kayak ladder "
    "magnet nectar otter parrot quiver raccoon saddle tortoise umbrella velvet wagon yak zephyr "
    "anchor biscuit cactus dragon easel fossil gazelle hornet island jackal koala lemur"
).split()


def parse_lengths(spec: str) -> List[int]:
    """Context lengths from ``"4k,8k,16k"`` (k = 1024, m = 1024**2) or plain token counts.

    Raises:
        ValueError: an empty list, a non-positive or unparseable entry.
    """
    out = []
    for part in str(spec).split(","):
        part = part.strip().lower()
        m = re.fullmatch(r"(\d+)([km]?)", part)
        if not m or int(m.group(1)) == 0:
            raise ValueError(f"lengths: {part!r} is not a positive token count like 4096, 4k or 128k")
        out.append(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2)])
    if not out:
        raise ValueError("lengths: at least one length is required")
    return sorted(dict.fromkeys(out))


def parse_tasks(spec: str) -> List[str]:
    """Task names from ``"single,multikey"``; ``"all"`` is every task.

    Raises:
        ValueError: an unknown task name.
    """
    names = [t.strip().lower() for t in str(spec).split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"tasks: unknown task {', '.join(bad) or '(none)'}; accepted: {', '.join(TASKS)} or all")
    return list(dict.fromkeys(names))


def parse_depths(spec: str) -> List[float]:
    """Needle depths: an int N gives N depths spread evenly over [0, 1] (one depth is 0.5);
    a comma list gives fractions in [0, 1] or percentages (``"0%,50%,100%"``).

    Raises:
        ValueError: a count below 1, a depth outside [0, 1], an unparseable entry.
    """
    spec = str(spec).strip()
    if re.fullmatch(r"\d+", spec):
        n = int(spec)
        if n < 1:
            raise ValueError(f"depths: the number of depths must be at least 1, got {n}")
        return [0.5] if n == 1 else [round(i / (n - 1), 6) for i in range(n)]
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            d = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(f"depths: {part!r} is not a fraction in [0, 1] or a percentage") from None
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depths: {part!r} is outside [0, 1] (or 0%..100%)")
        out.append(round(d, 6))
    return sorted(dict.fromkeys(out))


@dataclass(frozen=True)
class Needle:
    """One inserted needle: its key, value, requested depth and first token's index in the prompt."""

    key: str
    value: str
    depth: float
    token_index: int
    num_tokens: int


@dataclass
class Sample:
    """One NIAH prompt of exactly ``length`` tokens and what a correct answer contains."""

    task: str
    length: int
    depth: float
    trial: int
    input_ids: List[int]
    query_keys: List[str]
    answers: List[str]
    needles: List[Needle]
    max_new_tokens: int
    haystack_tokens: int
    meta: Dict[str, object] = field(default_factory=dict)


def parse_numbers(text: str) -> List[str]:
    """Every maximal run of digits in ``text`` (so ``12345678`` never counts as ``1234567``)."""
    return re.findall(r"\d+", text)


def parse_values(text: str, value_type: str = "number") -> List[str]:
    """The candidate values in ``text``: maximal digit runs, lower-cased words, or UUID-shaped strings."""
    if value_type == "number":
        return parse_numbers(text)
    if value_type == "word":
        return re.findall(r"[a-z]+", text.lower())
    if value_type == "uuid":
        return re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text.lower())
    raise ValueError(f"value_type must be one of {', '.join(VALUE_TYPES)}, got {value_type!r}")


def score(prediction: str, answers: Sequence[str], value_type: str = "number") -> Tuple[float, float]:
    """Exact-match score of a generated answer.

    Args:
        prediction: the generated text.
        answers: the expected values (7-digit strings, words or UUIDs).
        value_type: how values are delimited in the prediction: ``"number"`` (whole digit runs, so
            ``12345678`` never counts as ``1234567``), ``"word"`` (whole words, any case, among the
            first ``3 * len(answers) + 2`` words of the prediction) or ``"uuid"``.

    Returns:
        ``(accuracy, partial)``: accuracy is 1.0 if every expected value appears whole in the
        prediction, else 0.0; partial is the fraction of expected values that appear.

    Raises:
        ValueError: if ``answers`` is empty or ``value_type`` unknown.
    """
    if not answers:
        raise ValueError("answers must contain at least one expected value")
    values = parse_values(prediction, value_type)
    if value_type == "word":
        # words count only where the answer stands (the first few after "is" / "are"): a value word may
        # also occur in the haystack, and babbling haystack text must not score
        values = values[:WORD_WINDOW * len(answers) + 2]
    found = set(values)
    hits = sum(1 for a in answers if a.lower() in found)
    return float(hits == len(answers)), hits / len(answers)


def join_keys(keys: Sequence[str]) -> str:
    """``"a"``, ``"a, and b"``, ``"a, b, and c"``: how questions list keys and answers list values."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


class PromptBuilder:
    """Builds :class:`Sample` prompts for one tokenizer and haystack.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow) of the model under test.
        haystack: ``"essay"``, ``"noise"`` or a path to a text file (see :func:`load_haystack`).
        chat_template: ``"auto"`` (use the tokenizer's chat template when it has one), ``"on"``
            or ``"off"``.
        value_type: ``"number"`` (7 digits), ``"word"`` (one token of this tokenizer) or ``"uuid"``.

    Attributes:
        use_chat: whether prompts are wrapped in the chat template.
        special_prefix: the token ids the tokenizer puts in front of a text (BOS; none with a chat
            template, which carries its own); every prompt starts with them.

    Raises:
        ValueError: unknown ``chat_template`` or ``value_type``, ``"on"`` with a tokenizer without
            a chat template, a chat template that does not reproduce the user message verbatim, or
            ``"word"`` with a tokenizer that has too few single-token words.
    """

    def __init__(self, tokenizer, haystack: str = "essay", chat_template: str = "auto", value_type: str = "number"):
        if chat_template not in ("auto", "on", "off"):
            raise ValueError(f"chat_template must be auto, on or off, got {chat_template!r}")
        if value_type not in VALUE_TYPES:
            raise ValueError(f"value_type must be one of {', '.join(VALUE_TYPES)}, got {value_type!r}")
        self.value_type = value_type
        self.text = templates(value_type)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "on" and not has_template:
            raise ValueError("chat_template='on' but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.use_chat = has_template and chat_template != "off"
        self.sentences = load_haystack(haystack)
        self._sentence_ids = [self._encode(" " + s) for s in self.sentences]
        if self.use_chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _CHAT_MARK}], tokenize=False, add_generation_prompt=True
            )
            if rendered.count(_CHAT_MARK) != 1:
                raise ValueError("the tokenizer's chat template does not reproduce the user message verbatim")
            self._chat_pre, self._chat_post = rendered.split(_CHAT_MARK)
            self.special_prefix: List[int] = []
        else:
            self._chat_pre = self._chat_post = ""
            with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
            plain = tokenizer("a", add_special_tokens=False)["input_ids"]
            # keep only the tokens the tokenizer puts in front (BOS); never a trailing EOS
            n_front = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
            self.special_prefix = list(with_special[:n_front])
        self.value_words = self._single_token_words() if value_type == "word" else []

    def _single_token_words(self) -> List[str]:
        """Value words that are one token (after a space) of this tokenizer, never a key's word."""
        taken = set(KEY_ADJECTIVES) | set(KEY_NOUNS)
        pool = list(dict.fromkeys(VALUE_WORDS))
        words = [w for w in pool if w not in taken and len(self._encode(" " + w)) == 1]
        if len(words) < 4 * MIN_VALUE_WORDS:
            # content words of the haystack (a small vocabulary has few single-token common words)
            found = set(re.findall(r"\b[a-z]{5,10}\b", " ".join(self.sentences).lower()))
            extra = sorted(found - taken - set(words) - _FUNCTION_WORDS)
            words += [w for w in extra if len(self._encode(" " + w)) == 1]
        if len(words) < MIN_VALUE_WORDS:
            raise ValueError(f"value_type='word' needs at least {MIN_VALUE_WORDS} words that are one token of "
                             f"this tokenizer; found {len(words)}: use value_type='number' or 'uuid'")
        return words

    def _value(self, rng: random.Random, taken: set) -> str:
        """One fresh value of this builder's type, distinct from ``taken``."""
        while True:
            if self.value_type == "number":
                v = str(rng.randrange(1_000_000, 10_000_000))
            elif self.value_type == "word":
                v = rng.choice(self.value_words)
            else:
                v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if v not in taken:
                taken.add(v)
                return v

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tail(self, task: str, keys: Sequence[str]) -> List[int]:
        many = task in ("multiquery", "multivalue")
        question = self.text["QUESTION_ALL" if many else "QUESTION_ONE"].format(key=join_keys(keys))
        answer = self.text["ANSWER_ALL" if many else "ANSWER_ONE"].format(key=join_keys(keys))
        if self.use_chat:
            return self._encode("\n" + question + self._chat_post + answer)
        return self._encode("\n" + question + "\n" + answer)

    def build(self, task: str, length: int, depth: float, *, seed: int = 0, trial: int = 0,
              max_new_tokens: Optional[int] = None) -> Sample:
        """One sample of exactly ``length`` tokens.

        Args:
            task: one of :data:`TASKS`.
            length: prompt length in tokens of this tokenizer.
            depth: depth of the first needle, a fraction of the haystack in [0, 1].
            seed: global seed; the sample depends only on (seed, task, length, depth, trial).
            trial: index of the trial.
            max_new_tokens: generation budget (default :data:`DEFAULT_MAX_NEW_TOKENS`).

        Returns:
            The :class:`Sample`.

        Raises:
            ValueError: unknown task, a depth outside [0, 1], a non-positive length, or a length
                too short to hold the instructions, question and needles.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")
        rng = random.Random(f"niah|{seed}|{task}|{length}|{float(depth):.6f}|{trial}")

        n_keys = 1 if task in ("single", "multivalue") else NUM_NEEDLES
        keys = [f"{a}-{n}" for a, n in zip(rng.sample(KEY_ADJECTIVES, n_keys), rng.sample(KEY_NOUNS, n_keys))]
        n_values = NUM_NEEDLES if task != "single" else 1
        if self.value_type == "number":
            # the number stream of the original generator: samples built before value types are unchanged
            values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n_values)]
        else:
            taken: set = set()
            values = [self._value(rng, taken) for _ in range(n_values)]
        pairs = [(keys[0], v) for v in values] if task == "multivalue" else list(zip(keys, values))
        depths = [float(depth)] + [rng.random() for _ in pairs[1:]]
        query_keys = keys[:1] if task in ("single", "multikey", "multivalue") else keys
        answers = values[:1] if task in ("single", "multikey") else values

        head = self.special_prefix + self._encode(self._chat_pre + self.text["INTRO"])
        tail = self._tail(task, query_keys)
        needle_ids = [self._encode(" " + self.text["NEEDLE"].format(key=k, value=v)) for k, v in pairs]
        budget = length - len(head) - len(tail) - sum(map(len, needle_ids))
        if budget < 0:
            raise ValueError(
                f"length {length} is too short for task {task!r}: instructions, question and needles "
                f"alone take {length - budget} tokens of this tokenizer"
            )

        # haystack: whole sentences from a seeded start, cycled, the last one cut to fit exactly
        chunks: List[List[int]] = []
        filled, i = 0, rng.randrange(len(self.sentences))
        while filled < budget:
            ids = self._sentence_ids[i % len(self.sentences)][: budget - filled]
            chunks.append(ids)
            filled += len(ids)
            i += 1
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + len(c))

        # each needle goes to the sentence boundary nearest its depth
        slots: Dict[int, List[int]] = {}
        for n, d in enumerate(depths):
            b = min(range(len(starts)), key=lambda j: (abs(starts[j] - d * budget), j))
            slots.setdefault(b, []).append(n)
        ids: List[int] = list(head)
        placed: Dict[int, int] = {}
        for b in range(len(starts)):
            for n in slots.get(b, []):
                placed[n] = len(ids)
                ids.extend(needle_ids[n])
            if b < len(chunks):
                ids.extend(chunks[b])
        ids.extend(tail)
        if len(ids) != length:
            raise RuntimeError(f"internal error: built {len(ids)} tokens for length {length}")

        needles = [Needle(k, v, depths[n], placed[n], len(needle_ids[n])) for n, (k, v) in enumerate(pairs)]
        return Sample(
            task=task, length=length, depth=float(depth), trial=trial, input_ids=ids,
            query_keys=list(query_keys), answers=list(answers), needles=needles,
            max_new_tokens=int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]), haystack_tokens=budget,
            meta={"head_tokens": len(head), "tail_tokens": len(tail), "chat_template": self.use_chat,
                  "value_type": self.value_type},
        )
