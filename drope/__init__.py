"""drope: fast Triton attention and Hugging Face tooling for DroPE language models."""

from . import reference
from . import kernels  # noqa: F401
from . import hf  # noqa: F401  (registers "drope_triton" and the DroPE model types)
from .hf import get_temperature, set_temperature, to_drope, validate_temperature  # noqa: F401
from .hf.fit import TemperatureFit, fit_temperature  # noqa: F401
from .hf.recalibrate import recalibrate  # noqa: F401

__version__ = "0.1.0"

__all__ = ["reference", "__version__", "to_drope", "set_temperature", "get_temperature", "validate_temperature",
           "fit_temperature", "TemperatureFit", "recalibrate"]
