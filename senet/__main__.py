"""`python -m senet` is the `senet` command (also what `torchrun -m senet train ...` and `--nproc` start)."""
from senet.cli import main

raise SystemExit(main())
