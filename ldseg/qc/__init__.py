"""Quality control of a run: per-volume QC numbers, preview pictures and the HTML report.

Imported only when a run asks for `--preview`, `--qc`, `--labels` or `--report` (matplotlib and
jinja2 stay off the hot path otherwise).
"""
