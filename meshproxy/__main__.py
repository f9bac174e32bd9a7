"""``python -m meshproxy``: the same entry point as the ``meshproxy`` console script."""

from meshproxy.cli import main

raise SystemExit(main())
