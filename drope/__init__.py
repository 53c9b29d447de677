"""drope: fast Triton attention and Hugging Face tooling for DroPE language models.

``import drope`` is cheap: the submodules and the names in ``__all__`` load on first use, so
``import drope.kernels`` and ``import drope.reference`` never import transformers, and
``drope --help`` imports neither torch nor transformers.

Hugging Face users still get everything from ``import drope`` alone: ``"drope_triton"`` is registered
with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and the DroPE model types with
the Auto classes as soon as transformers is imported (at once when it already is, else by a one-shot
import hook that runs right after transformers' own package has loaded).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# public name -> (module, attribute in it; None: the module itself)
_LAZY = {
    "reference": ("drope.reference", None),
    "kernels": ("drope.kernels", None),
    "hf": ("drope.hf", None),
    "to_drope": ("drope.hf", "to_drope"),
    "set_temperature": ("drope.hf", "set_temperature"),
    "get_temperature": ("drope.hf", "get_temperature"),
    "validate_temperature": ("drope.hf", "validate_temperature"),
    "fit_temperature": ("drope.hf.fit", "fit_temperature"),
    "TemperatureFit": ("drope.hf.fit", "TemperatureFit"),
    "recalibrate": ("drope.hf.recalibrate", "recalibrate"),
    "RecalibrateConfig": ("drope.hf.recalibrate", "RecalibrateConfig"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'drope' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _register_with_transformers() -> None:
    # drope/hf/__init__ registers the attention and the model types when it is first imported
    importlib.import_module("drope.hf")


class _RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is first imported, it lets the other finders
    locate it and wraps the loader so that drope registers right after the package has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; the lookup below uses the remaining finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            loader.exec_module = exec_module
            try:
                _register_with_transformers()
            except Exception as e:  # an exception here would unload transformers itself
                warnings.warn(f"drope could not register with transformers: {type(e).__name__}: {e}",
                              RuntimeWarning, stacklevel=2)

        loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterOnTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnTransformersImport())
