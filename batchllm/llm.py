"""`LLM`: the vLLM-shaped Python API, a thin facade over an `Engine` (the loaded model, built once) and one
`BatchRun` per call (the batch's plan, scheduler and stats).

    llm = LLM("smollm2-135m-instruct", dtype="auto")            # options: batchllm.engine_args.EngineArgs
    outs = llm.generate(prompts, SamplingParams(max_tokens=64))   # outputs in input order
    for i, out in llm.generate_stream(prompts, params): ...       # as requests finish
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from batchllm.batch_run import Request
from batchllm.engine import Engine
from batchllm.engine_args import EngineArgs
from batchllm.inputs import E_PARAM, InvalidPrompt, PromptInput, check_fits
from batchllm.outputs import RequestOutput
from batchllm.sampling_params import SamplingParams, derive_seed
from batchllm.stats import RunStats

Prompt = str | dict | list


class LLM:
    """Offline batch inference. `model`: an HF folder, a .gguf file (or a folder holding one), a named model
    (`smollm2-135m-instruct`) or a hub id (see `batchllm.hub`); `options`: the fields of `EngineArgs`."""

    def __init__(self, model: str | Path, **options):
        self.engine = Engine(EngineArgs(model=str(model), **options))
        self._run = None
        self._stats = RunStats()

    # the engine's parts, for scripts and tests that look inside
    tokenizer = property(lambda self: self.engine.tokenizer)
    model_config = property(lambda self: self.engine.model_config)
    config = property(lambda self: self.engine.config)
    dtype = property(lambda self: self.engine.dtype)
    device = property(lambda self: self.engine.device)
    model_dir = property(lambda self: self.engine.model_dir)
    load_timings = property(lambda self: self.engine.load_timings)
    runner = property(lambda self: self.engine.runner)
    kv = property(lambda self: self.engine.kv)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self) -> RunStats:
        """Figures of the last generate/chat call (`stats.computed_prompt_tokens` or `stats["..."]`)."""
        return self._stats

    @property
    def progress(self) -> RunStats:
        """The figures of the call running now (the last call's once it ended)."""
        return self._run.stats if self._run is not None else self._stats

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _progress_bar(len(prompts), use_tqdm)
        for i, out in self.generate_stream(prompts, sampling_params):
            results[i] = out
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """`generate` over conversations (lists of messages) rendered by the tokenizer's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [PromptInput(messages=tuple(c), add_generation_prompt=add_generation_prompt)
                   if isinstance(c, (list, tuple)) and all(isinstance(m, dict) for m in c) else
                   InvalidPrompt(E_PARAM, "invalid conversation: a conversation must be a list of {'role': ..., "
                                          "'content': ...} messages") for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    # -------------------------------------------------------------------- scoring (lm-evaluation-harness terms)
    def loglikelihood(self, requests: Sequence[tuple[str | Sequence[int], str | Sequence[int]]],
                      use_tqdm: bool = False) -> list[tuple[float, bool]]:
        """For each (context, continuation): the sum of the continuation's token logprobs given the context, and
        whether every continuation token is the greedy one. Strings are tokenized as lm-eval's HF backend does
        (the tokenizer's special tokens in front; whitespace at the end of the context moves to the continuation,
        whose tokens are those of context + continuation past the context's; an empty context is the bos, or the
        eos without one); token lists are used as given. Only continuation positions reach the lm_head, nothing
        is sampled, and contexts shared by several requests (the choices of a question, a few-shot prefix) are
        computed once through the prefix plan."""
        return self.score_tokens([self._encode_pair(c, x) for c, x in requests], use_tqdm)

    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     use_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`loglikelihood` over token ids: (sum of logprobs of `continuation` after `context`, all greedy)."""
        prompts, params = [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("a continuation needs at least one token")
            context = list(context) or [self._prefix_token()]
            prompts.append({"prompt_token_ids": context + list(continuation)})
            params.append(SamplingParams(max_tokens=0, prompt_logprobs=1, prompt_logprobs_from=len(context)))
        results = []
        for (context, continuation), out in zip(pairs, self.generate(prompts, params, use_tqdm)):
            if out.error is not None:
                raise ValueError(f"cannot score a context of {len(context)} and a continuation of "
                                 f"{len(continuation)} tokens: {out.error}")
            lps = out.prompt_logprobs[len(out.prompt_token_ids) - len(continuation):]
            total = sum(e[t] for e, t in zip(lps, continuation))
            greedy = all(max(e, key=e.get) == t for e, t in zip(lps, continuation))
            results.append((total, greedy))
        return results

    def loglikelihood_rolling(self, texts: Sequence[str | Sequence[int]], use_tqdm: bool = False) -> list[float]:
        """Each text's total logprob (its first token given the bos, or the eos where the tokenizer has no bos),
        scored in disjoint windows that fill the model's context, each window seeing the token before it."""
        window = self.model_config.max_model_len - 1
        pairs, owner = [], []
        for i, text in enumerate(texts):
            ids = list(text) if not isinstance(text, str) else list(self.tokenizer(text)["input_ids"])
            previous = [self._prefix_token()]
            for start in range(0, len(ids), window):
                pairs.append((previous, ids[start:start + window]))
                owner.append(i)
                previous = ids[start + window - 1:start + window]
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self.score_tokens(pairs, use_tqdm)):
            totals[i] += lp
        return totals

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _encode_pair(self, context, continuation) -> tuple[list[int], list[int]]:
        if isinstance(context, str) and isinstance(continuation, str):
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tokenizer(context + continuation)["input_ids"]
            ctx = self.tokenizer(context)["input_ids"] if context else []
            return list(ctx), list(whole[len(ctx):])
        return ([*self.tokenizer(context)["input_ids"]] if isinstance(context, str) else list(context),
                [*self.tokenizer(continuation, add_special_tokens=False)["input_ids"]]
                if isinstance(continuation, str) else list(continuation))

    def generate_stream(self, prompts: Iterable[Prompt], sampling_params=None) -> Iterator[tuple[int, RequestOutput]]:
        """Run the batch, yielding (input index, output) as each request finishes."""
        prompts = list(prompts)
        requests = self._requests(prompts, _expand_params(sampling_params, len(prompts)))
        self._run = self.engine.start(requests)
        try:
            yield from self._run
        finally:
            self._stats, self._run = self._run.stats, None

    def _requests(self, prompts: list, params: list[SamplingParams]) -> list[Request]:
        """Requests of the prompts: tokenized in one batch, checked; a bad one carries its error."""
        engine = self.engine
        inputs: list[PromptInput | InvalidPrompt] = []
        for p in prompts:
            try:
                inputs.append(p if isinstance(p, (PromptInput, InvalidPrompt)) else PromptInput.of(p))
            except InvalidPrompt as e:
                inputs.append(e)
        ok = [i for i, x in enumerate(inputs) if isinstance(x, PromptInput)]
        texts, ids_list = engine.encoder.encode_with_text([inputs[i] for i in ok], engine.model_config.max_model_len)
        encoded = {i: (t, ids) for i, t, ids in zip(ok, texts, ids_list)}
        requests = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            text, ids = encoded.get(i, (None, inputs[i]))
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                text = prompt.get("prompt")  # a text given beside the ids is kept for the output
            seed = sp.seed if sp.seed is not None else derive_seed(engine.config.seed, i)
            error = ids if isinstance(ids, InvalidPrompt) else check_fits(
                len(ids), sp.max_tokens, engine.model_config.max_model_len, engine.config.kv_cache_blocks,
                engine.config.block_size)
            message = None if error is None else error.message
            if message is None and sp.structured_outputs is not None:
                message = engine.grammars.check(sp.structured_outputs)  # compiled once per distinct constraint
            requests.append(Request(i, text, ids if isinstance(ids, list) else [], sp, seed, message))
        return requests


def _expand_params(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", disable=os.environ.get("BATCHLLM_NO_TQDM") == "1")
