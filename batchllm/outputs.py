"""Output processing: what `LLM.generate` returns (shaped like vLLM's outputs, so code written for vLLM reads them
unchanged), and how each sampled token becomes text, logprobs and a stop decision. No torch.

    LeafOutput.append(seq, token, logprob, top)    one sampled token of one sample: returns the finished
                                                   CompletionOutput when the sample stops (check_stop says why)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchllm.detokenize import IncrementalDetokenizer, find_stop
from batchllm.request import Sequence
from batchllm.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "error"
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    # with structured_outputs: whether the text is complete under the constraint (False: max_tokens or the
    # context cut it short, finish_reason "length"); None without a constraint
    structured_output_complete: bool | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = True
    error: str | None = None
    # with SamplingParams(prompt_logprobs=k): per prompt position, {token: logprob} of the actual token and the k
    # most likely ones (None at position 0 and before prompt_logprobs_from)
    prompt_logprobs: list[dict[int, float] | None] | None = None


def check_stop(seq: Sequence, token: int, params: SamplingParams, eos_token_ids: frozenset[int],
               detok: IncrementalDetokenizer | None, new_text: str, max_model_len: int, grammar_done: bool = False
               ) -> tuple[str | None, str | int | None, str | None]:
    """Every stop rule, in one place, for the token just appended to `seq`: (finish_reason, stop_reason, text
    cut before a stop string or None). finish_reason None: go on. No stop (eos, stop token, stop string) counts
    before `min_tokens`; "length" at max_tokens or at the end of the context. `grammar_done`: the structured
    output's constraint can take no further token, so the output ends here ("stop"), without an EOS step."""
    n_out = seq.num_output_tokens
    if grammar_done:
        return "stop", None, None
    if n_out >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            return "stop", None, None
        if token in params.stop_token_ids:
            return "stop", token, None
        if detok is not None:
            full = detok.text
            at = find_stop(full, len(new_text), params.stop)
            if at is not None:
                return "stop", next(s for s in params.stop if full.startswith(s, at)), full[:at]
    if n_out >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length", None, None
    return None, None, None


class LeafOutput:
    """One sample (leaf) of one request while it runs: its detokenizer (only with stop strings), logprobs and
    cumulative logprob."""

    def __init__(self, index: int, params: SamplingParams, tokenizer, prompt_ids: list[int], grammars=None):
        self.index = index
        self.params = params
        self._grammars = grammars  # batchllm.structured.Grammars, for a request with structured_outputs
        self._matcher = None
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens) if params.stop else None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative = 0.0
        self.output: CompletionOutput | None = None

    @property
    def matcher(self):
        """The constraint's matcher (llguidance), made when the sample first needs a mask; None without one."""
        if self._matcher is None and self.params.structured_outputs is not None:
            self._matcher = self._grammars.matcher(self.params.structured_outputs)
        return self._matcher

    def append(self, seq: Sequence, token: int, logprob: float | None, top, eos_token_ids: frozenset[int],
               max_model_len: int) -> CompletionOutput | None:
        """Record a token already appended to `seq`; returns the finished output when the sample stops."""
        grammar_done = False
        if self._matcher is not None and token not in eos_token_ids:
            self._matcher.consume_token(token)  # the mask allowed it; a refusal leaves the matcher stopped
            grammar_done = self._matcher.is_stopped()
        if logprob is not None:
            self.cumulative += logprob
        if self.logprobs is not None:
            entry = {token: logprob} if logprob is not None else {}
            for t, v in top or ():
                entry.setdefault(t, v)
            self.logprobs.append(entry)
        new_text = self.detok.push(token) if self.detok is not None else ""
        reason, stop_reason, text = check_stop(seq, token, self.params, eos_token_ids, self.detok, new_text,
                                               max_model_len, grammar_done)
        if reason is None:
            return None
        return self.finish(seq, reason, stop_reason, text)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None,
               text: str | None = None) -> CompletionOutput:
        if text is None and self.detok is not None:
            self.detok.flush()
            text = self.detok.text
        if text is None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=self.params.skip_special_tokens)
        complete = None
        if self.params.structured_outputs is not None:
            complete = self._matcher is not None and (self._matcher.is_accepting() or self._matcher.is_stopped())
            self._matcher = None  # a finished sample's matcher is not needed any more
        self.output = CompletionOutput(self.index, text, list(seq.output_ids), reason, stop_reason,
                                       self.cumulative if self.params.logprobs is not None else None, self.logprobs,
                                       complete)
        return self.output
