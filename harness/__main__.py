"""``python -m harness serve|token|chat|demo``."""

import sys

from harness._cli import main

sys.exit(main())
