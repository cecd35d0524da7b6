"""Incremental detokenization and stop-string search (no torch).

``IncrementalDetokenizer`` uses the prefix-offset / read-offset technique: every push decodes two short windows of
the most recent token ids, ``ids[prefix:read]`` (text already emitted) and ``ids[prefix:]`` (the same plus the new
token), and emits the difference once it does not end in an incomplete character (U+FFFD). Decoding a window that
starts a few tokens back keeps decoders that treat the first token of a text specially (SentencePiece's leading
space) from changing the new text.

Exactness: for byte-level BPE tokenizers the final ``text`` (after ``flush()``) equals
``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``, which is what
``tokenizer.decode`` returns for every BPE tokenizer in transformers 5 (it skips the cleanup for BPE); this holds
for arbitrary id streams, invalid UTF-8 included (tested). The prompt tokens used as context are cut back to end on
a whole character, so a character split between prompt and output decodes as U+FFFD, as in the plain decode.
Known corner, by design: decoders that strip the leading space of the first token of a text (Metaspace /
SentencePiece) keep that space on the first output token, because it is decoded after the prompt (as in vLLM);
WordPiece-style cleanup (``clean_up_tokenization_spaces``) is not applied.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded in front of the first output token


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text, one token at a time.

    ``push`` returns the newly completed text ("" while a multi-byte character is incomplete, or for skipped special
    tokens); ``text`` is everything emitted so far. Call ``flush`` when the request finishes to emit what is left
    (a trailing incomplete character, decoded as U+FFFD like ``tokenizer.decode`` does).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._skip = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode_fn = backend.decode
        else:
            def _slow(ids, skip_special_tokens):
                return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)
            self._decode_fn = _slow
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        # The context must end on a whole character, else its trailing bytes would merge with the output's.
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        self._ids: list[int] = context
        self._prefix = 0  # start of the decoding window
        self._read = len(context)  # ids before this index are emitted
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        self._chunks: list[str] = []
        self._num_output = 0

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one output token; return the text it completes and advance the window when that text is whole."""
        self._ids.append(int(token_id))
        self._num_output += 1
        full = self._decode(self._ids[self._prefix:])
        if full.endswith(_REPLACEMENT) or len(full) < len(self._prefix_text):
            return ""  # an incomplete character: wait for its next bytes
        new_text = full[len(self._prefix_text):]
        self._prefix = self._read
        self._read = len(self._ids)
        # Drop the ids left of the window so memory stays O(window).
        if self._prefix > 0:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        if new_text:
            self._chunks.append(new_text)
        return new_text

    def flush(self) -> str:
        """Emit the pending text (an incomplete trailing character, as U+FFFD) and return it; call at the end."""
        if self._read == len(self._ids):
            return ""
        full = self._decode(self._ids[self._prefix:])
        new_text = full[len(self._prefix_text):]
        self._prefix = 0
        self._ids = []
        self._read = 0
        self._prefix_text = ""
        if new_text:
            self._chunks.append(new_text)
        return new_text

    @property
    def text(self) -> str:
        """All text emitted so far (by ``push`` and ``flush``)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_output_tokens(self) -> int:
        return self._num_output


def find_stop(text: str, new_text_len: int, stops: Sequence[str]) -> int | None:
    """Earliest index of ``text`` where a stop string begins, among matches overlapping the last ``new_text_len``
    characters; None when there is none. Costs O(len(stop) + new_text_len) per stop string.
    """
    if new_text_len <= 0 or not stops:
        return None
    new_start = len(text) - new_text_len
    best = None
    for stop in stops:
        start = max(0, new_start - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best):
            best = index
    return best
