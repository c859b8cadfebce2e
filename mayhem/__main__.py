"""``python -m mayhem``: the same as the ``mayhem`` command."""

import sys

from mayhem.cli import main

sys.exit(main())
