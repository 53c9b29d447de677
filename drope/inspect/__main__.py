"""``python -m drope.inspect``: the compile inspector's command (:func:`drope.inspect.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
