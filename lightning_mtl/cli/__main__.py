"""``python -m lightning_mtl.cli``: the ``lightning-mtl`` command."""

import sys

from lightning_mtl.cli import main

sys.exit(main())
