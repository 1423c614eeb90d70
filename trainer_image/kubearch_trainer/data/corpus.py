"""A small, offline, deterministic English-like corpus: procedurally generated "tiny stories".

Why generate instead of download: the default run (and CI) must work without network access, and
a comparison needs text with real structure at several scales (spelling, agreement between a
character's name and later pronouns, story arcs) so that architectures can be told apart by how
fast their loss falls. A seeded grammar gives that in ~0.1 s for a few hundred KB and produces the
same bytes on every machine.
"""

from __future__ import annotations

import random

_NAMES = {
    "she": ["Lily", "Mia", "Sara", "Emma", "Zoe", "Anna", "Nora", "Ruby", "Luna", "Ella"],
    "he": ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Noah", "Eli", "Owen"],
}
_POSSESSIVE = {"she": "her", "he": "his"}
_ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "fox", "duck", "bear", "mouse", "turtle"]
_ADJECTIVES = ["little", "big", "happy", "sleepy", "brave", "shy", "kind", "funny", "tiny", "red"]
_PLACES = ["park", "garden", "forest", "beach", "house", "lake", "farm", "hill", "school", "river"]
_OBJECTS = ["ball", "kite", "box", "hat", "book", "cake", "boat", "toy", "flower", "stone"]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
_VERBS_FOUND = ["found", "spotted", "caught", "reached", "saw"]
_FRIEND_ACTIONS = ["ran", "walked", "hopped", "raced", "went", "climbed"]


def _story(rng: random.Random) -> str:
    """One story: an opening, a problem, a helper, a resolution and a moral."""
    pron = rng.choice(["she", "he"])
    name = rng.choice(_NAMES[pron])
    poss = _POSSESSIVE[pron]
    animal, adj, place = rng.choice(_ANIMALS), rng.choice(_ADJECTIVES), rng.choice(_PLACES)
    obj, obj_adj = rng.choice(_OBJECTS), rng.choice(_ADJECTIVES)
    friend_pron = rng.choice(["she", "he"])
    friend = rng.choice([n for n in _NAMES[friend_pron] if n != name])
    weather = rng.choice(_WEATHER)
    opening = rng.choice(
        [
            f"Once upon a time, there was a {adj} {animal} named {name}.",
            f"One {weather} day, a {adj} {animal} named {name} went to the {place}.",
            f"There once was a {adj} {animal} called {name} who lived near the {place}.",
        ]
    )
    sentences = [opening]
    sentences.append(f"{pron.capitalize()} had a {obj_adj} {obj} that {pron} loved very much.")
    problem = rng.choice(
        [
            f"One day, {name} {rng.choice(['lost', 'dropped'])} {poss} {obj} in the {place}.",
            f"But the {obj} was stuck high up in a tree.",
            f"Then the wind took the {obj} far away.",
        ]
    )
    sentences.append(problem)
    sentences.append(f"{name} felt {rng.choice(['sad', 'scared', 'angry'])}.")
    sentences.append(f"{pron.capitalize()} met {friend}, a {rng.choice(_ADJECTIVES)} {rng.choice(_ANIMALS)}.")
    sentences.append(f'"Can you help me find my {obj}?" asked {name}.')
    sentences.append(f'"Yes, I will help you," said {friend}.')
    for _ in range(rng.randint(1, 3)):
        verb = rng.choice(_FRIEND_ACTIONS)
        sentences.append(f"{name} and {friend} {verb} to the {rng.choice(_PLACES)}.")
    sentences.append(f"At last, {friend} {rng.choice(_VERBS_FOUND)} the {obj} and gave it back to {name}.")
    feeling = rng.choice(["happy", "excited", "proud", "glad"])
    sentences.append(f"{name} was so {feeling} that {pron} hugged {friend}.")
    moral = rng.choice(
        [
            "Friends help each other.",
            "It is good to share and to be kind.",
            "Never give up, and ask for help when you need it.",
        ]
    )
    sentences.append(f"From that day on, {name} and {friend} were best friends. {moral}")
    return " ".join(sentences)


def tiny_stories(n_bytes: int = 400_000, seed: int = 0) -> str:
    """Stories separated by blank lines until at least ``n_bytes`` characters (ASCII only)."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < n_bytes:
        story = _story(rng)
        parts.append(story)
        total += len(story) + 2
    return "\n\n".join(parts) + "\n"
