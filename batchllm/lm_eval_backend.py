"""lm-evaluation-harness backend: `--model batchllm`. Every request of a task runs as one global batch, so the
few-shot prefix of a subject and the context shared by a question's choices are computed once.

    batchllm eval --model batchllm --model_args pretrained=DIR,dtype=float32 --tasks mmlu ...   (lm_eval's flags)

`pip install 'batchllm[eval]'` brings lm-eval 0.4.x. Its 0.4 releases load no plugin entry points, so `batchllm
eval` is lm_eval's command line with this backend registered first; in Python, `import batchllm.lm_eval_backend`
registers it for `lm_eval.simple_evaluate(model="batchllm", ...)`. The pyproject also declares it under the
`lm_eval.models` entry-point group, for releases that read one. Tokenization mirrors lm-eval's HF backend (the
tokenizer's special tokens unless `add_bos_token` says otherwise, the bos as the prefix of an empty context), so
scores are comparable with `--model hf`.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (lm-eval registers its own models only into an empty registry: first)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from batchllm.llm import LLM
from batchllm.sampling_params import SamplingParams

_TRUE = ("1", "true", "yes")


@register_model("batchllm")
class BatchLLMLM(TemplateLM):
    def __init__(self, pretrained: str, dtype: str = "auto", max_length: int | None = None,
                 add_bos_token: bool | str | None = None, max_gen_toks: int = 256, batch_size=None,
                 max_batch_size=None, device: str | None = None, **engine_options):
        """`pretrained`: what `LLM` takes (an HF folder, a .gguf, smollm2-135m-instruct); the other model_args are
        engine options (kv_cache_memory_bytes, block_size, ...). `device` (lm_eval's --device or a model_arg) is
        the engine's; `batch_size` and `max_batch_size` are accepted and ignored: the whole task is one batch."""
        super().__init__()
        options = {k: _number(v) for k, v in engine_options.items() if k != "trust_remote_code"}
        if device is not None:
            options["device"] = device
        self.llm = LLM(pretrained, dtype=dtype, max_model_len=_number(max_length), **options)
        self.tokenizer = self.llm.tokenizer
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in _TRUE
        self._max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.llm.model_config.max_model_len

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); context and continuation together are
        cut from the left to the model's context."""
        pairs = []
        for _, context, continuation in requests:
            keep = self.max_length - len(continuation)
            pairs.append((list(context)[-keep:] if keep > 0 else [], list(continuation)[-self.max_length:]))
        results = self.llm.score_tokens(pairs, use_tqdm=not disable_tqdm)
        for (cache_key, _, _), result in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total logprob over lm-eval's disjoint rolling windows of the model's context."""
        pairs, owner = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(token_list=self.tok_encode(request.args[0]),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.llm.score_tokens(pairs, use_tqdm=not disable_tqdm)):
            totals[i] += lp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task's gen_kwargs say) continuations, cut at the first `until` string."""
        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self._max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(max_tokens=max_gen, temperature=temperature, stop=[u for u in until if u]))
        outs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        texts = [o.outputs[0].text if o.error is None else "" for o in outs]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def _number(value):
    """model_args arrive as strings: integers become ints."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def main(argv: list[str] | None = None) -> int:
    """`batchllm eval ...`: lm_eval's command line, with this backend registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0
