"""Needle-in-a-haystack (RULER NIAH family) generator, runner, profiler and report for local models.

``drope niah --model DIR --lengths 4k,8k --out OUT`` runs a sweep; the pieces are importable::

    from drope.niah import PromptBuilder, RunConfig, run, score
"""

from .haystack import NOISE, generate_essay, load_haystack
from .report import format_table, load_run, plot_accuracy_vs_length, write_report
from .runner import NIAHError, RunConfig, SweepStopped, greedy_generate, run
from .tasks import TASKS, Needle, PromptBuilder, Sample, parse_depths, parse_lengths, parse_tasks, score

__all__ = [
    "NOISE", "generate_essay", "load_haystack", "format_table", "load_run", "plot_accuracy_vs_length",
    "write_report", "NIAHError", "RunConfig", "SweepStopped", "greedy_generate", "run", "TASKS", "Needle",
    "PromptBuilder", "Sample", "parse_depths", "parse_lengths", "parse_tasks", "score",
]
