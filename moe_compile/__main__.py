"""`python -m moe_compile ...` runs the moe-compile command line."""

from .cli import main

raise SystemExit(main())
