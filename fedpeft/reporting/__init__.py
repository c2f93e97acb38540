"""Turn a finished run's numbers into ``report.md``, ``plots/*.png`` and a terminal table.

Byte counts use SI units (base 1000) everywhere; see :func:`format_bytes`.
"""

from fedpeft.reporting.console import format_bytes, round_table
from fedpeft.reporting.plots import write_plots
from fedpeft.reporting.report import load_run, write_report

__all__ = ["format_bytes", "load_run", "round_table", "write_plots", "write_report"]
