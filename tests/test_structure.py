"""The shape of the code: no import cycle among batchllm's modules (imports inside functions included), and the
scheduler, prefix planner, KV bookkeeping and SamplingParams import without torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """batchllm module -> the batchllm modules it imports anywhere in its code, functions included (a package
    import counts as its __init__; `from package import name` counts as the submodule when there is one by that
    name, else as the package)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t in modules else node.module for t in subs]
            for t in targets:
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "batchllm.scheduler" in graph["batchllm.batch_run"]  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


TORCH_FREE = ["batchllm", "batchllm.sampling_params", "batchllm.scheduler", "batchllm.admission", "batchllm.batch",
              "batchllm.request", "batchllm.kv.manager", "batchllm.kv.block_pool", "batchllm.prefix.plan",
              "batchllm.prefix.tree", "batchllm.config", "batchllm.engine_args", "batchllm.inputs",
              "batchllm.outputs", "batchllm.stats", "batchllm.model_config", "batchllm.machine",
              "batchllm.jobs.openai_batch", "batchllm.distributed.shard"]


def test_the_core_imports_without_torch():
    """In a fresh interpreter where `import torch` fails, the core modules import, plan a batch and schedule it."""
    code = "\n".join([
        "import sys",
        "sys.modules['torch'] = None  # any import of torch now raises ImportError",
        *[f"import {m}" for m in TORCH_FREE],
        "from batchllm import SamplingParams",
        "from batchllm.batch import build_sequences",
        "from batchllm.config import EngineConfig",
        "from batchllm.prefix.plan import plan_batch",
        "from batchllm.scheduler import Scheduler",
        "prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9]]",
        "plan = plan_batch(prompts, 2)",
        "seqs = build_sequences(plan, prompts, [2, 2], [0, 1], [0, 0], 'batchllm')",
        "sched = Scheduler(EngineConfig(block_size=2, kv_cache_blocks=16, policy='batchllm'))",
        "sched.add(seqs.roots)",
        "step = sched.schedule()",
        "assert [s.is_node for s in step.seqs] == [True] and step.num_new == [4], step",
        "assert SamplingParams(max_tokens=3).max_tokens == 3",
        "print('ok')",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
