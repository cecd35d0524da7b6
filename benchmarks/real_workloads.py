"""Real-text workloads for the real model (SmolLM2-135M-Instruct): prompts rendered by its chat template and
tokenized here, outputs ending at EOS (capped by max_tokens), so every engine gets the same token ids and stops
where the model says. The documents are Python's own module docstrings (the running interpreter's), the rest is
written out below.

    fewshot    4 classification tasks x 12 queries; each prompt a 5-shot prefix of its task (~600 tokens), 8 out
    rag        6 documents (module docstrings, 550-1450 tokens) x 8 questions, 96 out
    chat       64 questions under one ~350-token system prompt, 128 out
    plain      48 distinct plain-text prompts (no template, nothing shared), 64 out
"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

REAL_WORKLOAD_NAMES = ("fewshot", "rag", "chat", "plain")

TASKS = {
    "sentiment": ("Classify the sentiment of each customer review as positive, negative or neutral.", [
        ("The blender is powerful, quiet and easy to clean. I use it every morning for smoothies and it has not "
         "let me down once in six months.", "positive"),
        ("The package arrived two weeks late, the box was crushed and the charger inside did not work at all. "
         "Support never answered my emails.", "negative"),
        ("The chair is exactly as described. Assembly took about twenty minutes and the instructions were "
         "ordinary.", "neutral"),
        ("These running shoes are the most comfortable I have ever owned. My knees no longer hurt after long runs "
         "and they look great too.", "positive"),
        ("The hotel room smelled of smoke, the air conditioning was broken and the staff shrugged when we "
         "complained. We left a day early.", "negative"),
    ], ["I love how light this laptop is, and the battery easily lasts a full working day.",
        "The coffee tasted burnt and the cup leaked all over my desk.",
        "The book arrived on Tuesday in a plain envelope.",
        "Fantastic service: the technician came the same day and fixed everything in an hour.",
        "The app crashes every time I try to upload a photo, which makes it useless.",
        "The lamp gives a warm light and the switch is where you expect it.",
        "Worst pizza in town: cold, soggy and forty minutes late.",
        "My kids adore this board game and we play it every weekend.",
        "The jacket is blue and has two pockets.",
        "The headphones broke after a week and the refund took two months.",
        "Great value for the price, I would happily buy it again.",
        "The train was on time and the seats were fine."]),
    "topic": ("Label each news headline with its topic: politics, sports, science, business or culture.", [
        ("Parliament passes the new budget after a long night of debate over taxes and public spending.",
         "politics"),
        ("The home team wins the championship final with a goal in the last minute of extra time.", "sports"),
        ("Astronomers detect water vapour in the atmosphere of a planet orbiting a nearby star.", "science"),
        ("Shares of the car maker jump after it reports record profits and announces a new factory.", "business"),
        ("The city museum opens a retrospective of the painter's early landscapes and portraits.", "culture"),
    ], ["The central bank raises interest rates for the third time this year.",
        "A new species of frog is discovered in the rainforest canopy.",
        "The tennis champion retires after twenty years on the tour.",
        "The prime minister meets foreign leaders to discuss the trade agreement.",
        "The orchestra announces a season of music by living composers.",
        "Researchers sequence the genome of an ancient wheat variety.",
        "The marathon record falls on a cool morning in Berlin.",
        "The retailer closes a hundred stores as online sales grow.",
        "A new novel by the prize-winning author tops the bestseller list.",
        "Voters head to the polls in a closely fought regional election.",
        "The chip maker buys a rival for twelve billion dollars.",
        "Engineers test a rocket engine that burns methane."]),
    "intent": ("Decide whether each customer message is a question, a complaint or a request.", [
        ("Do you ship to Canada, and if you do, how long does delivery usually take?", "question"),
        ("I have been charged twice for the same order and nobody has fixed it for a week.", "complaint"),
        ("Please cancel my subscription at the end of this month and send me a confirmation.", "request"),
        ("What is the difference between the basic plan and the premium plan?", "question"),
        ("The replacement part you sent is the wrong size again, which is the third mistake.", "complaint"),
    ], ["Can I change the delivery address after the order has shipped?",
        "Please send me an invoice for last month's purchase.",
        "The courier left my parcel in the rain and everything inside is ruined.",
        "How do I reset my password if I no longer have access to my email?",
        "I would like to upgrade my account to the family plan.",
        "Your website has been down all morning and I cannot pay my bill.",
        "Is there a discount for students?",
        "Please remove my phone number from your marketing list.",
        "The product description promised a metal case but it is plastic.",
        "When does the summer sale start?",
        "Add a second user to my account, please.",
        "My order number is wrong on every email you send me."]),
    "language": ("Name the language each sentence is written in.", [
        ("Le train part à huit heures et arrive à Lyon avant midi.", "French"),
        ("Der Hund schläft den ganzen Nachmittag im Garten.", "German"),
        ("La casa de mis abuelos está cerca del mar.", "Spanish"),
        ("The library closes early on Sundays during the summer.", "English"),
        ("Il gatto dorme sul divano vicino alla finestra.", "Italian"),
    ], ["Nous avons mangé une excellente soupe de légumes.",
        "Ich lerne jeden Abend eine Stunde Mathematik.",
        "Mañana vamos a visitar el museo de arte moderno.",
        "She painted the fence green last weekend.",
        "Domani pioverà su tutta la costa.",
        "Les enfants jouent dans le parc après l'école.",
        "Wir fahren im August an die Nordsee.",
        "El restaurante abre a las nueve de la noche.",
        "The river floods every spring after the snow melts.",
        "La nonna prepara la pasta ogni domenica.",
        "Le musée est fermé le mardi.",
        "Das Konzert beginnt um acht Uhr."]),
}

RAG_MODULES = ("re", "json", "statistics", "turtle", "urllib.request", "argparse")
RAG_QUESTIONS = [
    "In one sentence, what is this module for?", "Name three functions or classes the module provides.",
    "Give a short example of how to use it.", "What kind of input does it work on?",
    "What should a beginner watch out for when using it?", "Which other module is it related to, if any?",
    "Summarize the document in two sentences.", "What is the most important idea in the text?",
]

SYSTEM = (
    "You are the support assistant of Northwind Home, a shop that sells furniture, lamps, kitchen tools and garden "
    "equipment online and in twelve stores. Follow these rules in every answer. Be polite, brief and concrete: answer "
    "in at most four sentences unless the customer asks for details. Never invent order numbers, prices, delivery "
    "dates or stock levels; if you do not know, say so and explain where the customer can find the answer. Orders "
    "ship within two working days; standard delivery takes three to five days, express delivery one to two days for "
    "a fee of nine euros. Returns are free within thirty days if the item is unused and in its original packaging; "
    "large furniture is collected from the customer's home. Refunds are paid to the original payment method within "
    "ten days of the return arriving at the warehouse. Assembly service is available for furniture in most cities for "
    "a fee that depends on the item. Gift cards never expire and cannot be exchanged for cash. Stores open from nine "
    "to eight on weekdays and from ten to six on Saturdays; they are closed on Sundays and public holidays. The "
    "loyalty programme gives one point per euro spent, and one hundred points are worth five euros. Do not discuss "
    "competitors, politics or topics unrelated to the shop; steer the conversation back kindly. If a customer is "
    "angry, acknowledge the problem first and then offer the next concrete step. Always end with a short question "
    "asking whether anything else is needed."
)
CHAT_TOPICS = ["a sofa", "a garden hose", "a ceiling lamp", "a set of knives", "a wooden desk", "a gift card",
               "an office chair", "a barbecue grill", "a bookshelf", "a frying pan", "a lawn mower", "curtains"]
CHAT_TEMPLATES = ["How long does delivery of {} take?", "Can I return {} I bought last week?",
                  "Do you offer assembly for {}?", "My order of {} arrived damaged, what now?",
                  "Is {} available in your Berlin store?", "How do I pay for {} with loyalty points?"]

PLAIN_MODULES = ("argparse", "csv", "itertools", "unittest", "pydoc", "heapq", "doctest", "http.server",
                 "subprocess", "sqlite3", "typing", "tempfile", "random", "optparse", "collections", "string")


def _docstring(module: str) -> str:
    return " ".join((importlib.import_module(module).__doc__ or "").split())


def _chat(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fewshot_prompts(tokenizer, queries_per_task: int) -> list[list[int]]:
    prompts = []
    for instruction, shots, queries in TASKS.values():
        examples = "\n\n".join(f"Text: {t}\nLabel: {label}" for t, label in shots)
        for q in queries[:queries_per_task]:
            user = f"{instruction}\n\n{examples}\n\nText: {q}\nLabel:"
            prompts.append(_chat(tokenizer, [{"role": "user", "content": user}]))
    return prompts


def make_real_workload(name: str, model_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    """A workload dict for the harness (see workloads.py): token-id prompts, max_tokens, ignore_eos False."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    if name == "fewshot":
        prompts, out, desc = _fewshot_prompts(tokenizer, 6 if quick else 12), 8, "4 tasks x 5-shot prefix"
    elif name == "rag":
        prompts = [_chat(tokenizer, [{"role": "system", "content": "Answer using only the document below.\n\n"
                                                                  + _docstring(m)},
                                     {"role": "user", "content": q}])
                   for m in RAG_MODULES[: 3 if quick else 6] for q in RAG_QUESTIONS]
        out, desc = 96, "module docstrings as documents x 8 questions"
    elif name == "chat":
        questions = [t.format(x) for x in CHAT_TOPICS for t in CHAT_TEMPLATES][: 24 if quick else 64]
        prompts = [_chat(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
                   for q in questions]
        out, desc = 128, "questions under one support-policy system prompt"
    elif name == "plain":
        words = " ".join(_docstring(m) for m in PLAIN_MODULES).split()
        starts = sorted(rng.sample(range(len(words) - 200), 16 if quick else 48))
        prompts = [list(tokenizer(" ".join(words[s:s + 120]), add_special_tokens=True)["input_ids"]) for s in starts]
        out, desc = 64, "plain-text continuations, nothing shared"
    else:
        raise ValueError(f"unknown real workload {name!r}; expected one of {REAL_WORKLOAD_NAMES}")
    rng.shuffle(prompts)  # sharers arrive apart, as in a real input file
    eos = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("eos_token_id")
    lengths = [len(p) for p in prompts]
    return {"name": name, "description": f"{desc}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, "
                                         f"up to {out} out, ending at EOS",
            "prompts": prompts, "max_tokens": [out] * len(prompts), "ignore_eos": False,
            "stop_token_ids": eos if isinstance(eos, list) else [eos],
            "kv_cache_memory_bytes": None, "kv_tokens_no_sharing": sum(lengths) + out * len(prompts),
            "shape": {"real": name, "quick": quick}}
