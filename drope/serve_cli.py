"""``drope serve``: transformers' OpenAI-compatible server (``transformers serve``) on a local DroPE checkpoint.

transformers serve (5.2x) needs two things a DroPE checkpoint does not give it, and this command supplies both
without changing transformers:

- the DroPE classes: the server's processes must have imported drope (which registers ``llama_drope``,
  ``qwen2_drope``, ... with transformers' Auto classes). Its model process is started with the ``spawn`` method,
  which re-imports this process's main module: ``drope`` (or ``python -m drope.cli``) imports drope there too.
- loading by class name: its loader resolves ``config.architectures[0]`` as an attribute of the transformers
  package (``cli/serving/model_manager.py``, ``ModelLoader._load_model``), which a registered DroPE class is not;
  a config that names no architecture loads through ``AutoModelForCausalLM`` instead. So the server is given a
  *view* of the checkpoint: a temporary directory of links to its files, with a copy of ``config.json`` whose
  ``architectures`` is removed (the weights, tokenizer and everything else are the checkpoint's own).

The attention is drope's by default: ``drope`` (or ``drope_triton``) serves through the kernel repository of
:func:`drope.hf.continuous_batching_attention` (transformers serve accepts a Hub-kernel name for
``--attn-implementation``; the ``LOCAL_KERNELS`` mapping it sets is inherited by the server's processes), so
requests run drope's kernels with the DroPE classes' QK-norm and temperature fused, one by one or under
``--continuous-batching``. ``sdpa`` and the other names transformers serve accepts stay available.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from typing import List

# drope's kernels (as their kernel repository), then what transformers serve accepts besides Hub kernels
# (model_manager._validate_args)
DROPE_NAMES = ("drope", "drope_triton")
SERVE_IMPLEMENTATIONS = DROPE_NAMES + ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local directory of the checkpoint to serve (config.json, weights, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--device", default="auto", help="device for inference ('auto', 'cpu', 'cuda:0')")
    parser.add_argument("--attn-implementation", default="drope", choices=SERVE_IMPLEMENTATIONS,
                        help="attention implementation: drope's kernels (drope, or its alias drope_triton), or one "
                             "transformers serve accepts")
    parser.add_argument("--continuous-batching", action="store_true",
                        help="serve with transformers' continuous batching (on drope's kernels by default)")
    parser.add_argument("serve_args", nargs="*", metavar="-- SERVE_OPTION",
                        help="further `transformers serve` options, after `--` (e.g. -- --continuous-batching)")


def checkpoint_view(model_dir: str, root: str, keep_architectures: bool = False) -> str:
    """A directory under ``root`` holding links to every file of ``model_dir`` and a ``config.json`` without
    ``architectures`` (so transformers serve loads it through AutoModelForCausalLM); returns its path.
    ``keep_architectures``: the config unchanged (transformers serve before 5.2x, :func:`expose_for_old_loader`)."""
    # the checkpoint's own folder name ("." or "/" name no folder: "model")
    name = os.path.basename(os.path.abspath(model_dir))
    view = os.path.join(root, name if name not in ("", ".", "..") else "model")
    os.makedirs(view)
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(view, name))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if not keep_architectures:
        config.pop("architectures", None)
    with open(os.path.join(view, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return view


def expose_for_old_loader(model_dir: str) -> bool:
    """transformers serve before 5.2x (5.17) resolves ``config.architectures[0]`` as an attribute of the transformers
    package with no fallback (``cli/serving/model_manager.py``: ``getattr(transformers, config.architectures[0])``): in
    this process only, the checkpoint's DroPE class is made such an attribute (the view keeps the checkpoint's
    ``architectures`` then). 5.2x loads a config without ``architectures`` through AutoModelForCausalLM instead."""
    import inspect

    import transformers
    from transformers.cli.serving import model_manager

    if "not config.architectures" in inspect.getsource(model_manager):
        return False
    with open(os.path.join(model_dir, "config.json")) as f:
        names = json.load(f).get("architectures") or []
    from drope.hf import modeling

    for name in names:
        cls = getattr(modeling, name, None)
        if cls is not None and not hasattr(transformers, name):
            setattr(transformers, name, cls)
    return True


def serve_command(view: str, args: argparse.Namespace, attn: str) -> List[str]:
    rest = list(args.serve_args)
    if args.continuous_batching and "--continuous-batching" not in rest:
        rest.insert(0, "--continuous-batching")
    return ["serve", view, "--host", args.host, "--port", str(args.port), "--device", args.device,
            "--attn-implementation", attn, *rest]


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"drope serve: model must be a local checkpoint directory with a config.json, got {args.model!r}",
              file=sys.stderr)
        return 2
    config_path = os.path.join(args.model, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"drope serve: {config_path} is not a readable JSON file ({e})", file=sys.stderr)
        return 2
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        print(f"drope serve: {config_path} must hold a JSON object with a model_type (a transformers config), got "
              f"{type(config).__name__ if not isinstance(config, dict) else 'no model_type'}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"drope serve: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        print('drope serve needs transformers\' serving extra: pip install "transformers[serving]"', file=sys.stderr)
        return 2
    import drope  # registers the DroPE model types in this process
    from transformers.cli.transformers import app

    attn = args.attn_implementation
    if attn in DROPE_NAMES:
        try:
            attn = drope.hf.continuous_batching_attention()
        except ImportError as e:
            print(f"drope serve: {e}; or pass --attn-implementation sdpa", file=sys.stderr)
            return 2

    # a plain `kill` ends the server like Ctrl-C, so the view is removed (uvicorn handles both while it runs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="drope-serve-") as root:
        old_loader = expose_for_old_loader(args.model)
        view = checkpoint_view(args.model, root, keep_architectures=old_loader)
        print(f"drope serve: serving {os.path.abspath(args.model)} as {view} on http://{args.host}:{args.port} "
              f"(attention: {attn}{', continuous batching' if args.continuous_batching else ''})", flush=True)
        try:
            app(serve_command(view, args, attn), prog_name="drope serve")
        except SystemExit as e:
            return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
