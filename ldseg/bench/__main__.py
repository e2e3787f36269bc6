"""`python -m ldseg.bench ...` == `ldseg-bench ...` (ldseg/cli/bench.py), usable before the console
script is installed."""

from ldseg.cli.bench import main

main()
