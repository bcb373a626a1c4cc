"""Mixture-of-Depths (docs/methods.md §2), by job:

  policy.py       `MoDPolicy`: for each use (train, eval, sample, analysis sweep, calibration) how
                  tokens are routed and whether skipped work is really skipped; `Routing`, the
                  blocks' segments and the sublayers that may skip
  selection.py    the mechanism: top-k selection with gather-only custom gradients, causal
                  thresholds (really skipped under `lax.cond`), `run_routed`, `skip_stats`
  thresholds.py   the thresholds' EMA during training (checkpointed accumulators)
  accounting.py   kept tokens, executed fractions, the K/V rule and the selection's FLOPs

Calibrating thresholds on a trained model runs the whole model, so it lives above it, in
`nagjax.infer.calibration`.
"""

from nagjax.model.mod.accounting import (executed_fractions, kept_tokens, kv_follows_execution, realised_rate,
                                         selection_flops)
from nagjax.model.mod.policy import DENSE, MoDPolicy, Routing, eligible_sublayers, segments
from nagjax.model.mod.selection import Selection, gather_tokens, run_routed, select_topk, skip_stats
from nagjax.model.mod.thresholds import init_thresholds, trained_thresholds, update_thresholds

__all__ = [
    "DENSE", "MoDPolicy", "Routing", "Selection", "eligible_sublayers", "executed_fractions", "gather_tokens",
    "init_thresholds", "kept_tokens", "kv_follows_execution", "realised_rate", "run_routed", "segments",
    "select_topk", "selection_flops", "skip_stats", "trained_thresholds", "update_thresholds",
]
