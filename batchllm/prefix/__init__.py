"""Global prefix planning over a whole batch: a prefix tree built over blocks, its ends extended to the token;
nested / one-level / no-sharing plans."""

from batchllm.prefix.plan import MODES, PlanNode, PlanStats, PrefixPlan, analyze_batch, plan_batch

__all__ = ["MODES", "PlanNode", "PlanStats", "PrefixPlan", "analyze_batch", "plan_batch"]
