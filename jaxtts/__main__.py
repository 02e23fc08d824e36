"""`python -m jaxtts ...` is the `jaxtts` command (for environments without the console script)."""

from jaxtts.cli import main

raise SystemExit(main())
