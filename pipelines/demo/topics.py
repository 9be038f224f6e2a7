"""Built-in topic prompts for the demo's offline corpus, and the topics the demo steers by meaning.

The demo corpus is mostly text SmolLM2-135M-Instruct writes from these prompts (``pipelines/demo/run.py``), so the
SAE trained on it learns features about everyday and safety-relevant *topics* (animals, food, weather, money,
medicine, war, music, code, emotions, deception, scams, violence, ...), not only syntax.

``TOPICS`` (from ``topics.json`` beside this file) maps a topic to subjects (noun phrases). Each subject becomes one
prompt, in one of the ``GENRES`` (news report, story, explainer, dialogue, ...), rotating so every topic appears in
many genres.
``topic_prompts()`` orders the prompts round-robin over topics, so any prefix of the list (a small generation
budget) still covers every topic evenly. Safety-relevant topics are framed as news, history, fiction or
safety advice: the point is text *about* deception, scams, weapons or misuse, never instructions for them.

Everything here is plain data and pure functions: no model, no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: the prompts' data, kept as data: ``genres`` (each with ``{s}`` for a subject), ``topics`` (group -> topic ->
#: subjects, each of which must read well after "about" and after "Describe"/"Explain") and ``extra_prompts``
#: (hand-written prompts kept from the first demo, many genres, some safety-relevant, mixed in after the topics)
TOPICS_FILE = Path(__file__).with_name("topics.json")
_DATA = json.loads(TOPICS_FILE.read_text(encoding="utf-8"))
GENRES: tuple[str, ...] = tuple(_DATA["genres"])
#: topic -> subjects (the groups of ``topics.json`` flattened, in file order)
TOPICS: dict[str, tuple[str, ...]] = {t: tuple(s) for group in _DATA["topics"].values() for t, s in group.items()}
EXTRA_PROMPTS: tuple[str, ...] = tuple(_DATA["extra_prompts"])


@dataclass(frozen=True)
class TopicPrompt:
    topic: str
    prompt: str


def topic_prompts() -> list[TopicPrompt]:
    """All built-in prompts, round-robin over topics (any prefix covers the topics evenly), deterministic."""
    per_topic: list[list[TopicPrompt]] = []
    for ti, (topic, subjects) in enumerate(TOPICS.items()):
        per_topic.append(
            [TopicPrompt(topic, GENRES[(ti * 3 + si) % len(GENRES)].format(s=s)) for si, s in enumerate(subjects)]
        )
    out: list[TopicPrompt] = []
    for depth in range(max(len(p) for p in per_topic)):
        out.extend(p[depth] for p in per_topic if depth < len(p))
    # the hand-written extras go in evenly, one every len(out) // len(EXTRA_PROMPTS) prompts
    step = max(1, len(out) // len(EXTRA_PROMPTS))
    for i, p in enumerate(EXTRA_PROMPTS):
        out.insert(min(len(out), (i + 1) * step + i), TopicPrompt("mixed", p))
    return out


def words(text: str) -> tuple[str, ...]:
    """``"dog, puppy, black hole"`` -> ``("dog", "puppy", "black hole")``."""
    return tuple(w.strip() for w in text.split(",") if w.strip())


@dataclass(frozen=True)
class SteerTopic:
    """A topic the demo looks up by meaning (concept search) to print a working steering command."""

    name: str
    examples: tuple[str, ...]
    counter: tuple[str, ...]
    keywords: tuple[str, ...]  # whole words (plus -s/-ed/-ing...); a stored context containing one is on topic
    prompt: str  # a neutral prompt to steer


STEER_TOPICS: tuple[SteerTopic, ...] = (
    SteerTopic(
        "dogs",
        (
            "The puppy wagged its tail and barked at the mailman.",
            "She took her dog for a walk in the park and threw a stick for him to fetch.",
            "Our old labrador sleeps by the fire and loves belly rubs.",
        ),
        (
            "The train left the station ten minutes late.",
            "He paid the electricity bill online.",
            "The recipe needs two cups of flour and one egg.",
        ),
        words("dog, puppy, puppies, bark, leash, labrador, retriever, sheepdog, canine, pet, fetch, paw, kennel"),
        "Write a short story about a walk in the park.",
    ),
    SteerTopic(
        "food",
        (
            "She chopped the onions and garlic and fried them in olive oil.",
            "The soup was hot and spicy, with fresh bread on the side.",
            "For dessert we baked a chocolate cake with strawberries.",
        ),
        (
            "The meeting was moved to Thursday afternoon.",
            "He repaired the bicycle's flat tyre.",
            "The river flows north towards the sea.",
        ),
        words(
            "food, cook, cooking, recipe, soup, bread, cake, bake, baking, meal, dinner, lunch, breakfast, eat, "
            "ate, eating, kitchen, chef, flour, cheese, sauce, fruit, vegetable, pasta, curry, dish, delicious, "
            "taste, spicy, garlic, onion, restaurant"
        ),
        "Write a short story about a day at the office.",
    ),
    SteerTopic(
        "weather",
        (
            "Dark clouds gathered and heavy rain began to fall.",
            "The storm brought thunder, lightning and strong winds.",
            "It was a cold morning, with snow covering the ground.",
        ),
        (
            "She opened a savings account at the bank.",
            "The cat chased a mouse around the kitchen.",
            "He wrote a Python function to sort the list.",
        ),
        words(
            "weather, rain, rainy, storm, stormy, snow, snowy, wind, windy, cloud, cloudy, thunder, thunderstorm, "
            "lightning, sunny, sunshine, forecast, fog, foggy, temperature, heatwave, hurricane, freezing, frost, "
            "drizzle, hail"
        ),
        "Write a short story about a trip to the market.",
    ),
    SteerTopic(
        "music",
        (
            "The orchestra played a beautiful symphony.",
            "He strummed his guitar and sang a song.",
            "The band played loud rock music at the concert.",
        ),
        (
            "The doctor checked the patient's blood pressure.",
            "The bridge was closed for repairs.",
            "They planted tomatoes in the garden.",
        ),
        words(
            "music, musical, musician, song, sing, sang, singer, singing, guitar, piano, orchestra, concert, "
            "band, melody, symphony, jazz, choir, rhythm, violin, drum"
        ),
        "Write a short story about a walk in the park.",
    ),
)
