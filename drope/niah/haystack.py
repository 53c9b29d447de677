"""Haystack text for the NIAH tasks: a shipped generated essay, RULER's noise, or a local file.

The shipped essay (``data/essay.txt``) is produced by :func:`generate_essay` from the word lists
below with a fixed seed, so it is reproducible, free of copyright, and contains no digits (a
haystack digit could be mistaken for a needle's value). ``python -m drope.niah.haystack`` rewrites it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import List, Union

DATA_DIR = Path(__file__).parent / "data"
ESSAY_PATH = DATA_DIR / "essay.txt"
ESSAY_SEED = 20260
ESSAY_PARAGRAPHS = 420

# RULER's repeated-noise haystack (one unit, repeated as often as needed).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

HAYSTACKS = ("essay", "noise")

_ADJ = (
    "quiet busy old narrow bright patient careful distant stubborn gentle restless modest curious "
    "honest steady clever humble ancient silent hidden sudden simple crowded lonely rusty polished "
    "wooden crooked generous cautious ordinary peculiar familiar forgotten hopeful weary cheerful "
    "practical reluctant foolish thoughtful serious"
).split()
_NOUN = (
    "founder engineer teacher gardener farmer writer painter sailor baker merchant student "
    "carpenter doctor scientist musician traveler neighbour investor clerk librarian miller "
    "shepherd builder mechanic potter weaver"
).split()
_PLACE = (
    "village harbour market library workshop garden orchard station valley river bank kitchen "
    "office school bridge mill courtyard hillside meadow lighthouse bakery factory square "
    "museum forest"
).split()
_THING = (
    "idea plan tool book letter habit lesson map ladder lantern recipe machine company startup "
    "essay argument garden boat bicycle clock question problem story rumour promise method"
).split()
_VERB_PAST = (
    "built repaired sold borrowed questioned explained described ignored noticed studied "
    "abandoned improved copied finished rewrote tested shared praised doubted remembered"
).split()
_ABSTRACT = (
    "patience ambition curiosity luck habit discipline courage doubt taste judgement "
    "attention trust effort humility persistence"
).split()
_TIME = (
    "in the morning|at dusk|after the long winter|before the harvest|during the storm|on the "
    "first warm day of spring|late at night|at the end of the season|while the others slept|"
    "in the autumn"
).split("|")

_TEMPLATES = (
    "The {adj} {noun} {verb} the {thing} {time}.",
    "Nobody in the {place} expected the {noun} to care so much about {abstract}.",
    "Most people think {abstract} is a gift, but the {adj} {noun} insisted it was a {thing} one learns.",
    "{time_cap}, the {noun} walked to the {place} and {verb} an old {thing}.",
    "It is easy to underestimate how much {abstract} a small {thing} can demand.",
    "The {noun} kept a {adj} {thing} by the door of the {place}, just in case.",
    "When the {thing} failed, the {noun} {verb} it again with more {abstract}.",
    "There was a {adj} {place} where every {noun} {verb} the same {thing} {time}.",
    "What the {noun} learned was that {abstract} matters more than a clever {thing}.",
    "A {adj} {thing} is often better than a perfect one that never leaves the {place}.",
    "The {noun} from the {place} said little, but everyone {verb} the {thing} anyway.",
    "If you ask a {noun} about {abstract}, you will hear a story about a {adj} {thing}.",
    "Years later the {noun} still remembered the {place} and the {adj} {thing} in it.",
    "Some ideas look {adj} at first and only make sense to the {noun} who {verb} them.",
    "The best way to judge a {thing} is to watch a {adj} {noun} use it {time}.",
    "Between the {place} and the {place2} there was a road that only the {noun} used.",
    "Everyone agreed that the {thing} was {adj}, and nobody agreed on what to do about it.",
    "The {adj} {noun} wrote a letter about {abstract} and left it in the {place}.",
    "It takes {abstract} to admit that a {thing} you {verb} was never quite right.",
    "In the {place}, the {noun} and the {noun2} argued about the {thing} {time}.",
    "Small decisions about a {thing} add up, the {noun} said, the way rain fills a {place}.",
    "The {noun2} {verb} the {thing}, and the {noun} quietly {verb2} it again.",
    "A {thing} that solves a real problem rarely looks impressive at the start.",
    "The {adj} {noun} believed that {abstract} and {abstract2} were the same thing seen from two sides.",
)


def _sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    time = rng.choice(_TIME)
    noun, noun2 = rng.sample(_NOUN, 2)
    place, place2 = rng.sample(_PLACE, 2)
    abstract, abstract2 = rng.sample(_ABSTRACT, 2)
    verb, verb2 = rng.sample(_VERB_PAST, 2)
    text = template.format(
        adj=rng.choice(_ADJ), noun=noun, noun2=noun2, place=place, place2=place2,
        thing=rng.choice(_THING), verb=verb, verb2=verb2, abstract=abstract, abstract2=abstract2,
        time=time, time_cap=time[0].upper() + time[1:],
    )
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def generate_essay(seed: int = ESSAY_SEED, paragraphs: int = ESSAY_PARAGRAPHS) -> str:
    """Deterministic essay-like filler text with no digits.

    Args:
        seed: seed of the generator.
        paragraphs: number of paragraphs (4 to 8 sentences each).

    Returns:
        The text, paragraphs separated by blank lines.

    Raises:
        ValueError: if ``paragraphs`` is not a positive int.
    """
    if not isinstance(paragraphs, int) or paragraphs < 1:
        raise ValueError(f"paragraphs must be a positive int, got {paragraphs!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        out.append(" ".join(_sentence(rng) for _ in range(rng.randint(4, 8))))
    return "\n\n".join(out) + "\n"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> List[str]:
    """Split text into sentences at whitespace after ``.``, ``!`` or ``?`` (paragraph breaks too)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def load_haystack(source: Union[str, Path] = "essay") -> List[str]:
    """The haystack as a list of sentences.

    Args:
        source: ``"essay"`` (the shipped generated essay), ``"noise"`` (RULER's repeated noise)
            or the path of a local UTF-8 text file.

    Returns:
        A non-empty list of sentences, cycled by the task generator as long as needed.

    Raises:
        ValueError: unknown name, missing or empty file, or a file containing a run of 7 digits
            (it would be indistinguishable from a needle's value).
    """
    if isinstance(source, str) and source == "essay":
        text = ESSAY_PATH.read_text(encoding="utf-8")
    elif isinstance(source, str) and source == "noise":
        text = NOISE
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"haystack must be one of {', '.join(HAYSTACKS)} or the path of a text file; {str(source)!r} is neither"
            )
        text = path.read_text(encoding="utf-8")
        if re.search(r"\d{7}", text):
            raise ValueError(f"haystack file {path} contains a 7-digit number, which would be confused with a needle value")
    sentences = split_sentences(text)
    if not sentences:
        raise ValueError(f"haystack {str(source)!r} contains no text")
    return sentences


if __name__ == "__main__":
    DATA_DIR.mkdir(exist_ok=True)
    ESSAY_PATH.write_text(generate_essay(), encoding="utf-8")
    print(f"wrote {ESSAY_PATH} ({ESSAY_PATH.stat().st_size} bytes)")
