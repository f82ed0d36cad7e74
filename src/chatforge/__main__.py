"""``python -m chatforge ...``: the same dispatcher as the ``chatforge`` script, for when the
script is not on PATH (a venv not activated, ``python -m`` in CI)."""

import sys

from chatforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
