"""``python -m fastft``: the command line (see :mod:`fastft.cli`)."""

from .cli import main

raise SystemExit(main())
