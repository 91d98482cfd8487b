"""``python -m normonly ...``: the same as the ``normonly`` command (see ``normonly.cli``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
