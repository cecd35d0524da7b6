"""batchllm: offline, throughput-first LLM batch inference with global prefix sharing."""

from batchllm.outputs import CompletionOutput, RequestOutput
from batchllm.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # `LLM` pulls in torch and the model code; import it on first use so `batchllm analyze` and job validation
    # start fast.
    if name == "LLM":
        from batchllm.llm import LLM

        return LLM
    raise AttributeError(name)
