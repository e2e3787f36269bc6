"""Console scripts: one thin Typer layer per script over the package API.

run.py (ldseg-run), export.py (ldseg-export), train.py (ldseg-train), bench.py (ldseg-bench);
common.py holds what they share: the consoles, the error-to-exit-code entry point, --version and
the choices every option offers.
"""
