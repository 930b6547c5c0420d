"""``python -m gesim``: the command line (see :mod:`gesim.cli`)."""

from gesim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
