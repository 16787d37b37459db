"""``python -m moesaic`` is the ``moesaic`` command."""

import sys

from .train.cli import main

sys.exit(main())
