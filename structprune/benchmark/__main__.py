"""``python -m structprune.benchmark``: the same as ``structprune bench``."""
import sys

from .command import main

sys.exit(main())
