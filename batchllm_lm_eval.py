"""`lm_eval --model batchllm ...` with lm-evaluation-harness's own command line.

lm-eval 0.4.x reads no plugin entry points: its model registry holds only its own models. `python -m
batchllm_lm_eval` (`make install` runs it) writes `batchllm_lm_eval.pth` into site-packages; at interpreter start that
file calls `activate()`, which adds an import finder: once `lm_eval.models` has registered lm-eval's models, it adds
"batchllm" as a lazy placeholder. Neither batchllm nor torch is imported until an evaluation asks for the model.
Standard library only (it runs in every interpreter of the environment); `python -m batchllm_lm_eval --remove`
deletes the file. `batchllm eval ...` works without it.
"""

from __future__ import annotations

import sys

NAME = "batchllm"
TARGET = "batchllm.lm_eval_backend:BatchLLMLM"
# one line, run by site at interpreter start; a no-op once batchllm is uninstalled
PTH_LINE = ("import sys; exec('try:\\n import batchllm_lm_eval as m\\nexcept ImportError:\\n m = None\\n"
            "if m:\\n m.activate()')\n")


class _RegisterAfterLmEvalModels:
    """A sys.meta_path finder: finds `lm_eval.models` through the other finders and registers batchllm right after
    that module runs; then leaves sys.meta_path. (No importlib.abc base: it would cost every interpreter ~9 ms.)"""

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def run_and_register(module):
            run_module(module)
            from lm_eval.api.registry import model_registry

            if NAME not in model_registry:
                model_registry.register(NAME, target=TARGET)

        spec.loader.exec_module = run_and_register
        return spec


def activate() -> None:
    """Register batchllm with lm-eval when lm-eval loads its models (at once if it already has)."""
    if "lm_eval.models" in sys.modules:
        from lm_eval.api.registry import model_registry

        if NAME not in model_registry:
            model_registry.register(NAME, target=TARGET)
    elif not any(isinstance(f, _RegisterAfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLmEvalModels())


def pth_path():
    """Where the .pth goes: this environment's site-packages (imports here, not at interpreter start)."""
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_paths()["purelib"]) / "batchllm_lm_eval.pth"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = pth_path()
    if args == ["--remove"]:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    elif not args:
        path.write_text(PTH_LINE)
        print(f"wrote {path}: `lm_eval --model batchllm` now finds batchllm")
    else:
        raise SystemExit("usage: python -m batchllm_lm_eval [--remove]")


if __name__ == "__main__":
    main()
