"""`python -m server.cli ...`: what the console script `labelserve` runs (the allocator re-executes it so)."""

import sys

from server.cli import main

sys.exit(main())
