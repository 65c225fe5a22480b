"""``python -m cnn_numba ...``: the same as the ``cnn-numba`` command (see cnn_numba/cli.py)."""
import sys

from .cli import main

sys.exit(main())
