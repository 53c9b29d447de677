"""``python -m drope.kernels.inspect``: the compile inspector's command as DESIGN.md names it, kept working.

The inspector is a tool beside the kernels, in :mod:`drope.inspect` (``python -m drope.inspect``); this runs
its CLI with the same arguments, output and ``manifest.json``. Nothing is imported from here.
"""

if __name__ == "__main__":
    import sys

    from drope.inspect.cli import main

    sys.exit(main(module="drope.kernels.inspect"))
