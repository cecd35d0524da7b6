"""Scale-out: prefix-affinity sharding of the global plan over workers (`shard`, pure Python), a batch job over Ray
actors (`ray_runner`: `run_batch_file`, `batchllm run --ray`) and a Ray Data processor (`ray_data`:
`PrefixAffinityProcessor`). Ray is optional and imported only when one of the Ray parts runs."""

__all__ = ["run_batch_file", "PrefixAffinityProcessor"]


def __getattr__(name):
    # the Ray parts pull in the job machinery (and torch); import them on first use
    if name == "run_batch_file":
        from batchllm.distributed.ray_runner import run_batch_file

        return run_batch_file
    if name == "PrefixAffinityProcessor":
        from batchllm.distributed.ray_data import PrefixAffinityProcessor

        return PrefixAffinityProcessor
    raise AttributeError(name)
