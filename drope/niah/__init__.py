"""Needle-in-a-haystack (RULER NIAH family) generator, runner, profiler and report for local models.

``drope niah --model DIR --lengths 4k,8k --out OUT`` runs a sweep; the pieces are importable::

    from drope.niah import PromptBuilder, RunConfig, run, score

Everything other modules of drope (``drope demo``, the mini-model recipe) use is exported here.
"""

from ..cli import DefaultsHelpFormatter
from .haystack import NOISE, generate_essay, load_haystack
from .profile import attention_path, choose_threads, estimate_memory_mb, machine, set_threads
from .report import (format_table, load_run, log2_length_axis, mark_train_length, plot_accuracy_vs_length, pyplot,
                     series_style, write_report)
from .runner import (NIAHError, RunConfig, SlowPathWarning, SweepStopped, greedy_generate, load_model, load_tokenizer,
                     resolve_device, resolve_dtype, run)
from .tasks import (ANSWER_ALL, ANSWER_ONE, INTRO, KEY_ADJECTIVES, KEY_NOUNS, NEEDLE, NUM_NEEDLES, QUESTION_ALL,
                    QUESTION_ONE, TASKS, VALUE_TYPES, Needle, PromptBuilder, Sample, join_keys, parse_depths,
                    parse_lengths, parse_tasks, parse_values, score, templates)

__all__ = [
    "DefaultsHelpFormatter",
    "NOISE", "generate_essay", "load_haystack",
    "attention_path", "choose_threads", "estimate_memory_mb", "machine", "set_threads",
    "format_table", "load_run", "log2_length_axis", "mark_train_length", "plot_accuracy_vs_length", "pyplot",
    "series_style", "write_report",
    "NIAHError", "RunConfig", "SlowPathWarning", "SweepStopped", "greedy_generate", "load_model", "load_tokenizer",
    "resolve_device", "resolve_dtype", "run",
    "ANSWER_ALL", "ANSWER_ONE", "INTRO", "KEY_ADJECTIVES", "KEY_NOUNS", "NEEDLE", "NUM_NEEDLES", "QUESTION_ALL",
    "QUESTION_ONE", "TASKS", "VALUE_TYPES", "Needle", "PromptBuilder", "Sample", "join_keys", "parse_depths",
    "parse_lengths", "parse_tasks", "parse_values", "score", "templates",
]
