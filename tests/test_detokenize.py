"""Tests of incremental detokenization and stop-string search with a real byte-level BPE tokenizer.

Every test runs with the project's shared tokenizer (fixture ``tokenizer_dir``) and with a byte-level BPE trained
here on multi-script text (a few hundred merges, under a second).
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from batchllm.detokenize import IncrementalDetokenizer, find_stop

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Café crème brûlée, naïve façade, déjà vu, Ångström, smörgåsbord.",
    "東京は日本の首都です。今日は良い天気ですね。日本語のテキスト。",
    "北京欢迎你，你好世界！中文文本测试。",
    "Emoji: 😀😃🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and more 🚀✨",
    "def f(x):\n    return x * 2  # code\n\tindent",
    "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी",
] * 20

SAMPLES = [
    "Hello world, this is plain ASCII.",
    "Café crème brûlée — déjà vu.",
    "東京は日本の首都です。北京欢迎你！",
    "Emoji 😀 split 🎉 over 👍🏽 tokens 👨‍👩‍👧 🇯🇵",
    "Mixed: naïve 日本 😀 русский 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 z",
    "  leading spaces and trailing  ",
    "🚀",
    "unseen script: ქართული ენა ᚠᚢᚦ",
]


@pytest.fixture(scope="module", params=["shared", "local"])
def tokenizer(request):
    """The project's shared byte-level BPE (``tokenizer_dir``), and a local one trained on CORPUS here."""
    if request.param == "shared":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(request.getfixturevalue("tokenizer_dir")))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _stream(tokenizer, prompt_ids, output_ids, skip=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    chunks = [detok.push(t) for t in output_ids]
    chunks.append(detok.flush())
    return detok, chunks


def test_tokenizer_splits_characters_over_several_tokens(tokenizer):
    # the test is only meaningful if some characters need several tokens
    ids = tokenizer.encode("😀🎉👍🏽", add_special_tokens=False)
    assert len(ids) > 3
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("prompt", ["", "Prompt: 日本", "😀"])
def test_stream_equals_full_decode(tokenizer, text, prompt):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    detok, chunks = _stream(tokenizer, prompt_ids, output_ids)
    assert detok.text == "".join(chunks) == tokenizer.decode(output_ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in c for c in chunks)
    assert chunks[-1] == ""  # nothing was pending at the end
    assert detok.num_output_tokens == len(output_ids)


def test_incomplete_character_is_held_back(tokenizer):
    ids = tokenizer.encode("a😀b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    out = [detok.push(t) for t in ids]
    assert "".join(out) == "a😀b"
    # the emoji arrives whole in one chunk, after "" for its incomplete prefixes
    assert "😀" in out and out.count("") >= 1


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    eos = tokenizer.eos_token_id
    body = tokenizer.encode("日本 😀 ok", add_special_tokens=False)
    output_ids = [tokenizer.bos_token_id] + body[:3] + [eos] + body[3:] + [eos]
    detok, chunks = _stream(tokenizer, [], output_ids, skip=skip)
    expected = tokenizer.decode(output_ids, skip_special_tokens=skip)
    assert detok.text == expected
    assert ("</s>" in expected) is (not skip)


def test_random_token_streams_match_decode(tokenizer):
    # arbitrary ids (invalid UTF-8 included): after flush the text equals the full decode
    rng = random.Random(0)
    vocab = len(tokenizer)
    mismatches = 0
    for _ in range(300):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(0, 6))]
        output = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 25))]
        detok, chunks = _stream(tokenizer, prompt, output)
        mismatches += detok.text != tokenizer.decode(output, skip_special_tokens=True)
        assert not any(c.endswith("\ufffd") for c in chunks[:-1])  # push never emits a partial character
    assert mismatches == 0


def test_trailing_incomplete_character_comes_with_flush(tokenizer):
    ids = tokenizer.encode("ok😀", add_special_tokens=False)
    cut = ids[:-1]  # the emoji is cut short (as max_tokens would)
    detok = IncrementalDetokenizer(tokenizer, [])
    pushed = "".join(detok.push(t) for t in cut)
    assert pushed == "ok"
    assert detok.flush().endswith("\ufffd")
    assert detok.text == tokenizer.decode(cut)
    assert detok.flush() == ""


# ----------------------------------------------------------------------------------------------------------------------
# find_stop
# ----------------------------------------------------------------------------------------------------------------------


def test_find_stop_basic():
    assert find_stop("hello world", 5, ["wor"]) == 6
    assert find_stop("hello world", 5, ["xyz"]) is None
    assert find_stop("hello world", 0, ["world"]) is None
    assert find_stop("hello world", 5, []) is None


def test_find_stop_only_matches_overlapping_new_text():
    text = "STOP then more"
    assert find_stop(text, 4, ["STOP"]) is None  # the old match was handled when it was new
    assert find_stop(text, len(text), ["STOP"]) == 0
    # a stop string straddling old and new text is found
    assert find_stop("abcST" + "OP", 2, ["STOP"]) == 3


def test_find_stop_earliest_of_several():
    text = "xx<end>yy###"
    assert find_stop(text, 9, ["###", "<end>"]) == 2
    assert find_stop(text, 9, ["###", "d>y"]) == 5


def test_find_stop_streaming_equals_whole_search(tokenizer):
    rng = random.Random(1)
    stops = ["日本", "😀!", "ab", "\n\n"]
    for _ in range(100):
        pieces = [rng.choice(["a", "b", "日", "本", "😀", "!", "\n", "x "]) for _ in range(rng.randrange(1, 30))]
        ids = tokenizer.encode("".join(pieces), add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer, [])
        found = None
        for t in ids:
            new = detok.push(t)
            found = find_stop(detok.text, len(new), stops)
            if found is not None:
                break
        whole = [i for i in (detok.text.find(s) for s in stops) if i != -1]
        assert found == (min(whole) if whole else None)
