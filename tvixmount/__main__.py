"""``python -m tvixmount``: the ``tvixmount`` command, for a Python without the installed script."""

import sys

from .cli import main

sys.exit(main())
