"""The ``drope`` console script: one subcommand per feature module.

Each module named in ``COMMANDS`` defines ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when its subcommand runs, so ``drope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, one-line help)
COMMANDS = {
    "recalibrate": ("drope.hf.recalibrate", "convert a RoPE model to DroPE (if needed) and recalibrate it with the HF Trainer"),
    "fit-temperature": ("drope.hf.fit_cli", "fit a DroPE model's softmax temperature (one c, or per head) on local data"),
    "niah": ("drope.niah.cli", "needle-in-a-haystack accuracy and long-context profile of a local model"),
    "demo": ("drope.demo.cli", "RoPE (and its scaling methods) vs NoPE vs DroPE on NIAH beyond the training length, with the shipped mini models"),
    "train-mini": ("drope.demo.train", "train the shipped mini RoPE / NoPE / DroPE models from scratch (seeded recipe)"),
    "serve": ("drope.serve_cli", "serve a local DroPE checkpoint with transformers serve (OpenAI-compatible API)"),
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default; options whose default is None or off explain it in their help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def main(argv: Optional[Sequence[str]] = None) -> int:
    commands = COMMANDS
    parser = argparse.ArgumentParser(prog="drope", description="DroPE models: fast attention, conversion, recalibration, NIAH.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(commands[args.command][0])
    # every subcommand's --help shows its defaults
    cmd_parser = argparse.ArgumentParser(prog=f"drope {args.command}", description=commands[args.command][1],
                                         formatter_class=DefaultsHelpFormatter)
    module.add_arguments(cmd_parser)
    # everything after "--" passes through unparsed (drope serve's transformers serve options), wherever it stands
    passthrough = []
    if "--" in rest:
        i = rest.index("--")
        rest, passthrough = rest[:i], rest[i + 1:]
    args = cmd_parser.parse_args(rest)
    if passthrough:
        if not hasattr(args, "serve_args"):
            cmd_parser.error(f"unrecognized arguments: -- {' '.join(passthrough)}")
        args.serve_args = list(args.serve_args) + passthrough
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
