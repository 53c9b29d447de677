"""``python -m drope``: the ``drope`` console script (``torchrun --nproc_per_node N -m drope niah ...``)."""

import sys

from .cli import main

sys.exit(main())
