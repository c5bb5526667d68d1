"""``python -m jaxrlhf <stage> ...`` (same as the ``jaxrlhf`` console script)."""

import sys

from jaxrlhf.cli import main

sys.exit(main())
