"""``python -m structprune.benchmark``: the same as ``structprune bench``."""
import sys

from structprune.benchmark.command import main

sys.exit(main())
