"""`python -m ldseg.bench ...` == `ldseg-bench ...` (same error handling), usable before the
console script is installed."""

from ldseg.bench.command import bench_typer
from ldseg.cli import _entry

_entry(bench_typer, "ldseg-bench")()
