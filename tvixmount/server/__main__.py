"""``python -m tvixmount.server``: the gRPC daemon without the tvixstore CLI (tests, scripts)."""

import sys

from .daemon import main

sys.exit(main())
