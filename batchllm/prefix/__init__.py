"""Global prefix planning over a whole batch: block-aligned prefix tree, nested / one-level / no-sharing plans."""

from batchllm.prefix.plan import MODES, PlanNode, PlanStats, PrefixPlan, analyze_batch, plan_batch

__all__ = ["MODES", "PlanNode", "PlanStats", "PrefixPlan", "analyze_batch", "plan_batch"]
