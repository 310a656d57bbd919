"""`python -m tpo_fast.cli ...` (what `accelerate launch -m tpo_fast.cli` runs): the `tpo-fast` command."""

import sys

from tpo_fast.cli import main

sys.exit(main())
