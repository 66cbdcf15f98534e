"""`python -m owngpt ...` (also what `torchrun -m owngpt train ...` runs)."""

from owngpt.cli import main

raise SystemExit(main())
