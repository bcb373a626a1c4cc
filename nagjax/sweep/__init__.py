"""Sweeps that compare variants fairly: iso-FLOP budgets (iso_flop.py), depth at a fixed token
budget (depth.py), and their tables and plots (report.py). Sweeps sit above training and analysis:
they train runs and summarise them; nothing below imports them."""

from nagjax.sweep.depth import DepthSweep, run_depth_sweep
from nagjax.sweep.iso_flop import (MOD_DIAGNOSTICS, IsoFlopSweep, PlannedRun, Variant, grid, plan, run_result,
                                   run_sweep, summarise, train_run)

__all__ = ["MOD_DIAGNOSTICS", "DepthSweep", "IsoFlopSweep", "PlannedRun", "Variant", "grid", "plan", "run_depth_sweep",
           "run_result", "run_sweep", "summarise", "train_run"]
