"""`python -m mgll_data` is `mgll-build-dataset`."""

from .cli import main

main()
