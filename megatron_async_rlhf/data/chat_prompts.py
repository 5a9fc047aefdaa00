"""Open-ended chat prompts made locally: request templates x topics, for the chat pipeline (a miniature of the paper's
chatbot runs, where no prompt set can be downloaded). Requests ask for opinions, reviews, stories, letters and
descriptions of everyday things, events and activities, so a response can be warm or gloomy: what a sentiment judge
(``rewards/judges.py``: vader) scores.

Deterministic for a seed; every prompt is distinct; the held-out split is a random share of all (template, topic)
combinations. Rows are ``{"prompt": str}``, written as ``train.jsonl`` / ``test.jsonl`` that ``datasets.load_dataset``
reads like any local dataset.
"""

from __future__ import annotations

import json
import os
import random

from megatron_async_rlhf.weights.hf_io import replace_dir

THINGS = [
    "a rainy afternoon in the city", "the new coffee shop downtown", "an old paperback novel", "a crowded morning train",
    "a homemade apple pie", "the last day of summer", "a small mountain village", "a second-hand bicycle",
    "a thunderstorm at night", "a quiet public library", "the neighbor's barking dog", "a cheap hotel room",
    "a long flight in economy class", "a farmers' market on Saturday", "a cold cup of coffee", "an empty beach in winter",
    "a broken umbrella", "a handwritten letter", "a busy airport", "a vegetable garden", "a traffic jam on the highway",
    "a snowy forest trail", "an old movie theater", "a messy kitchen", "a street musician", "a new pair of shoes",
    "a hospital waiting room", "a city park in spring", "a noisy open-plan office", "a lighthouse by the sea",
    "a school cafeteria lunch", "a fast food burger", "a museum of modern art", "a road trip playlist",
    "a power outage", "a jigsaw puzzle with a missing piece", "a late-night bus", "fresh bread from a bakery",
    "a leaking roof", "a birthday cake", "a smartphone with a cracked screen", "a mountain sunrise", "a dentist's chair",
    "a board game night", "an overcooked pasta dinner", "a tiny studio apartment", "a garden full of roses",
    "a parking ticket", "a cozy wool sweater", "a stray cat", "a flat tire", "a hot bath after work",
    "a long queue at the post office", "a picnic by the lake", "a broken vending machine", "a rooftop terrace",
    "a slow internet connection", "a children's playground", "a pile of unpaid bills", "a warm fireplace",
]
EVENTS = [
    "a surprise birthday party", "missing the last bus home", "a job interview", "losing your keys",
    "a wedding in the countryside", "the first day at a new school", "a canceled flight", "winning a small prize",
    "a family dinner", "moving to a new city", "a power cut during a storm", "a reunion with an old friend",
    "failing a driving test", "a concert in the park", "getting lost in a foreign city", "a rainy football match",
    "a team project deadline", "a camping trip", "a visit to the dentist", "graduation day", "a noisy neighbor's party",
    "adopting a puppy", "a long hospital stay", "a school talent show", "a week without internet",
    "a marathon finish line", "a holiday at the beach", "a burnt Thanksgiving turkey", "an argument with a coworker",
    "a snow day", "the opening night of a play", "a delayed train", "a farewell party", "a first date",
    "a power outage at work", "a garage sale", "a visit to grandparents", "a hiking trip in the rain",
    "a broken-down car on a trip", "a neighborhood festival", "a spelling bee", "a lost suitcase", "a sunrise yoga class",
    "a boring meeting", "a charity run", "a picnic ruined by ants", "a science fair", "a job promotion",
    "a flooded basement", "a trip to the zoo", "a long night shift", "a cooking class", "a traffic accident on the way home",
    "a family road trip", "a surprise visit from a friend", "a cancelled concert", "a village fair", "a final exam",
    "a new baby in the family", "a quiet Sunday morning",
]
ACTIVITIES = [
    "learn to play the guitar", "clean the garage", "run a marathon", "wait at the dentist", "bake bread at home",
    "commute by bike in winter", "plant a vegetable garden", "learn a new language", "paint a room", "go camping alone",
    "cook for ten people", "work night shifts", "study for exams", "walk a dog every morning", "fix a leaking tap",
    "travel with small children", "volunteer at a food bank", "sit in traffic every day", "write a novel",
    "move house", "train for a triathlon", "knit a scarf", "clean up after a party", "teach a child to ride a bike",
    "fly in a small plane", "queue for concert tickets", "wake up at five every day", "assemble flat-pack furniture",
    "learn to swim as an adult", "grow tomatoes on a balcony", "do your taxes", "coach a kids' soccer team",
    "hike up a mountain", "sing in a choir", "work from home", "take a cold shower", "repair an old bicycle",
    "look after a sick friend", "cook a new recipe", "organize a birthday party", "practice the piano daily",
    "sort a messy closet", "go fishing at dawn", "ride a crowded subway", "write letters by hand", "wash a car by hand",
    "take care of a houseplant", "learn to juggle", "bake cookies with kids", "pack for a long trip", "mow the lawn",
    "walk home in the rain", "read a long classic novel", "watch the sunset", "do a jigsaw puzzle", "feed the birds",
    "drive on icy roads", "go to a job fair", "visit a museum alone", "spend a day without a phone",
]
_TEMPLATES = [
    (THINGS, [
        "Write a short review of {t}.", "What do you think about {t}?", "Describe {t} in two sentences.",
        "Tell me a short story about {t}.", "Give me your honest opinion of {t}.",
        "How would you describe {t} to a friend?", "Write a short social media post about {t}.",
        "Write a haiku about {t}.", "What is the best thing about {t}?", "Write a diary entry that mentions {t}.",
        "Write a two-line poem about {t}.", "Describe how {t} makes you feel.",
    ]),
    (EVENTS, [
        "Write a diary entry about {t}.", "How would you feel about {t}?", "Describe {t}.",
        "Write a short letter to a friend about {t}.", "Tell me a short story about {t}.",
        "Write a text message to your mother about {t}.", "Describe {t} in three sentences.",
        "What would you remember most about {t}?", "Write a short news report about {t}.",
        "Write a short speech about {t}.", "Tell me how {t} went.", "Write a postcard about {t}.",
    ]),
    (ACTIVITIES, [
        "What is it like to {t}?", "Write two sentences about what it is like to {t}.", "Is it fun to {t}?",
        "Describe how it feels to {t}.", "Would you recommend that a friend {t}? Why?",
        "Tell me a short story about someone who had to {t}.", "Write a diary entry about a day when you had to {t}.",
        "Give me your honest opinion: should people {t}?", "How would you describe the experience to {t}?",
        "Write a short message encouraging a friend to {t}.", "What surprised you when you tried to {t}?",
        "Write a short blog post about trying to {t}.",
    ]),
]


def chat_prompts(seed: int = 0) -> list[str]:
    """Every (template, topic) combination, shuffled with ``seed``: 3 x 12 templates x 60 topics = 2160 prompts."""
    out = [tpl.format(t=topic) for topics, tpls in _TEMPLATES for tpl in tpls for topic in topics]
    assert len(set(out)) == len(out), "two template/topic combinations read the same"
    random.Random(seed).shuffle(out)
    return out


def chat_splits(test_size: int = 200, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts), disjoint."""
    prompts = chat_prompts(seed)
    if not 0 < test_size < len(prompts):
        raise ValueError(f"test_size={test_size}: there are {len(prompts)} prompts")
    return prompts[test_size:], prompts[:test_size]


def write_chat_jsonl(out_dir: str, test_size: int = 200, seed: int = 0) -> str:
    """``train.jsonl`` and ``test.jsonl`` of ``{"prompt": ...}`` rows under ``out_dir``, written atomically."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name, rows in zip(("train", "test"), chat_splits(test_size, seed)):
        with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
            for p in rows:
                f.write(json.dumps({"prompt": p}) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir
