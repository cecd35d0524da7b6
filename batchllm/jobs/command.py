"""`batchllm run`: the command. It picks pass 2 (Ray's for --ray, else the local engine's), runs the job
(`batchllm.jobs.job`) and turns its failures into exit codes and one-line reasons."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from batchllm.jobs.guard import JobStopped
from batchllm.jobs.job import build_llm, execute_job, local_pass
from batchllm.jobs.scan import JobError


def run_job(args: argparse.Namespace, llm_factory: Callable[[argparse.Namespace], Any] = build_llm) -> int:
    """The whole job; 0 when it ran. Raises JobError when it cannot start."""
    if getattr(args, "ray", None) is not None:
        from batchllm.distributed.ray_runner import import_ray, ray_pass

        try:  # before any work: a missing Ray is a one-line error, not a late crash
            import_ray()
        except ImportError as e:
            raise JobError(f"--ray: {e}") from None
        execute_job(args, ray_pass)
    else:
        execute_job(args, partial(local_pass, llm_factory=llm_factory))
    return 0


def main(args: argparse.Namespace) -> int:
    """Runs the job; 0 when it ran (whatever failed line by line), 2/1 with a one-line reason when it cannot run,
    128 + the signal on SIGTERM (143) or SIGINT (130), after saving every finished result (rerun to resume)."""
    try:
        return run_job(args)
    except JobError as e:
        print(f"batchllm run: error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(f"batchllm run: stopped by {e}: every finished result is saved in {args.output}; rerun the same "
              "command to resume", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("batchllm run: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a one-line reason, no traceback; finished results are already synced
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"batchllm run: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
