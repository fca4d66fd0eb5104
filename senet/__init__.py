"""The `senet` command line, on top of every package: argument parsing, exit codes and printing.

`python -m senet COMMAND ...` (or the `senet` console script, or `torchrun -m senet train ...`). Each
`cmd_*` module holds one group of commands; the work itself is done by the library packages below
(`slurm`, `training`, `pipeline`, `models`), which never import this one.
"""
