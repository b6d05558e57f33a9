"""``python -m structprune``: the same commands as the ``structprune`` console script."""
from structprune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
