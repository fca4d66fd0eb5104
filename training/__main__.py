"""`python -m training` is the `senet` command."""
from training.cli import main

raise SystemExit(main())
