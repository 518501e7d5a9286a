"""``python -m fuzz``: see :mod:`fuzz.runner`."""

from __future__ import annotations

from fuzz.runner import main

raise SystemExit(main())
