"""`python -m mgll_train` is `mgll-train` (and works under `torchrun -m mgll_train`)."""

from .cli import main

main()
