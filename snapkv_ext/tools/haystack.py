"""The project's own needle-in-a-haystack material: filler text written for this project (no
download), a pass-key needle at a chosen depth, and a retrieval check."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List

FILLER = [
    "The harbour town wakes early, and the fishing boats leave before the light reaches the hills.",
    "A kettle on the stove hums quietly while somebody in the next room sorts old letters into piles.",
    "Rain on a tin roof sounds louder at night, when the street below has gone completely still.",
    "The library keeps its atlases on the lowest shelf, where children can pull them out and spread them open.",
    "In autumn the orchard smells of fallen apples, and wasps drift lazily between the rows of trees.",
    "The night train stops at every small station, and the conductor knows most passengers by name.",
    "A carpenter measures twice before cutting, then sweeps the shavings into a neat pile by the door.",
    "On market days the square fills with stalls selling cheese, honey, wool and hand-painted bowls.",
    "The river bends twice before the bridge, and herons stand motionless in the shallow water.",
    "Old maps show roads that no longer exist and villages whose names have quietly changed.",
    "A choir rehearses in the church hall on Thursdays, and the windows carry the sound across the lane.",
    "The baker's first loaves come out at five, and the smell reaches the bus stop on the corner.",
    "Snow settles first on the fence posts, then on the hedges, and finally on the wide empty fields.",
    "The museum guard has watched the same painting for years and still notices something new each week.",
    "A lighthouse keeper once wrote down the weather every hour, filling hundreds of careful notebooks.",
    "Bicycles lean against the school railings, their baskets holding lunch boxes and folded raincoats.",
    "The garden path is lined with lavender, and bees work through it from morning until dusk.",
    "In the workshop, clocks of every size tick slightly out of step with one another.",
    "The ferry crossing takes forty minutes, long enough to drink tea and watch the gulls follow the wake.",
    "A potter shapes the clay slowly, wetting her hands again and again as the wheel turns.",
    "The mountain hut has six bunks, a wood stove, and a visitors' book older than most of its guests.",
    "Streetlights flicker on one by one as the evening fog rolls in from the estuary.",
    "The allotments behind the station grow beans, marrows and more rhubarb than anyone can eat.",
    "An old radio in the corner plays quiet music, and nobody remembers who first switched it on.",
]


@dataclass
class NeedleCase:
    prompt: str
    answer: str
    depth: float


def haystack(n_sentences: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    out: List[str] = []
    while len(out) < n_sentences:
        block = FILLER[:]
        rng.shuffle(block)
        out.extend(block)
    return out[:n_sentences]


def needle_case(tokenizer, n_tokens: int, depth: float, seed: int = 0, question: str | None = None) -> NeedleCase:
    """A chat prompt of about ``n_tokens`` tokens: filler with a pass key hidden at ``depth``
    (0 = start, 1 = end of the document), then the question."""
    rng = random.Random(seed * 1000 + int(depth * 100) + n_tokens)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    per_sentence = max(1, len(tokenizer.encode(" ".join(FILLER))) / len(FILLER))
    n = max(2, int(n_tokens / per_sentence))
    sents = haystack(n, seed)
    sents.insert(int(round(depth * len(sents))), needle)
    question = question or "What is the pass key? Answer with the number only."
    doc = "There is a pass key hidden in the following text. Find it and memorize it.\n\n" + " ".join(sents)
    return NeedleCase(prompt=doc + "\n\n" + question, answer=key, depth=depth)


def chat_ids(tokenizer, text: str):
    """Token ids of one user message with the generation prompt, as a [1, L] tensor."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def retrieved(answer_text: str, key: str) -> bool:
    return key in re.sub(r"[^0-9]", " ", answer_text).split() or key in answer_text


# Five facts of different kinds, for asking several questions of one document.
FACTS = [
    ("The pass key is 60494. Remember the pass key 60494.", "What is the pass key? Answer with the number only.", "60494"),
    ("The boat in the harbour is named Marigold.", "What is the name of the boat in the harbour?", "Marigold"),
    ("Mr. Hale lives in Ostend.", "In which town does Mr. Hale live?", "Ostend"),
    ("The old lamp costs 37 dollars.", "How many dollars does the old lamp cost?", "37"),
    ("The baker's cat is named Pepper.", "What is the name of the baker's cat?", "Pepper"),
]


def facts_document(tokenizer, n_tokens: int, seed: int = 0):
    """(document ids [1, L], [(question ids [1, q], answer)]) as one chat turn split in two: the
    document is the turn's start, each question its end (with the generation prompt), so that
    document + question is exactly the chat prompt of the whole message."""
    per_sentence = max(1, len(tokenizer.encode(" ".join(FILLER))) / len(FILLER))
    sents = haystack(max(len(FACTS) * 2, int(n_tokens / per_sentence)), seed)
    for i, (fact, _, _) in enumerate(FACTS):
        sents.insert(int((i + 0.5) / len(FACTS) * len(sents)) + i, fact)
    text = "Read the following text carefully.\n\n" + " ".join(sents)
    marker = "\u0000QUESTION\u0000"
    whole = tokenizer.apply_chat_template([{"role": "user", "content": text + "\n\n" + marker}],
                                          add_generation_prompt=True, tokenize=False)
    pre, post = whole.split(marker)
    doc = tokenizer(pre, return_tensors="pt", add_special_tokens=False)["input_ids"]
    questions = [(tokenizer(q + post, return_tensors="pt", add_special_tokens=False)["input_ids"], a)
                 for _, q, a in FACTS]
    return doc, questions
