"""drope: fast Triton attention and Hugging Face tooling for DroPE language models."""

from . import reference

__version__ = "0.1.0"

__all__ = ["reference", "__version__"]
