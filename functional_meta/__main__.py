"""``python -m functional_meta``: see :mod:`functional_meta.cli`."""

import sys

from functional_meta.cli import main

sys.exit(main())
