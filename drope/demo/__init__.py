"""The DroPE claim in miniature: a seeded recipe that trains tiny RoPE / NoPE / DroPE models on locally
generated retrieval data (``drope train-mini``), the shipped checkpoints it produced, and ``drope demo``,
which compares them (and RoPE's PI / NTK / YaRN scaling) on NIAH beyond the training length.
"""

from .cli import CHECKPOINTS, MODELS, checkpoint_path, run_demo  # noqa: F401

__all__ = ["CHECKPOINTS", "MODELS", "checkpoint_path", "run_demo"]
