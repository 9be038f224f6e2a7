"""Built-in topic prompts for the demo's offline corpus, and the topics the demo steers by meaning.

The demo corpus is mostly text SmolLM2-135M-Instruct writes from these prompts (``pipelines/demo/run.py``), so the
SAE trained on it learns features about everyday and safety-relevant *topics* (animals, food, weather, money,
medicine, war, music, code, emotions, deception, scams, violence, ...), not only syntax.

``TOPICS`` maps a topic to subjects (noun phrases). Each subject becomes one prompt, in one of the
``GENRES`` (news report, story, explainer, dialogue, ...), rotating so every topic appears in many genres.
``topic_prompts()`` orders the prompts round-robin over topics, so any prefix of the list (a small generation
budget) still covers every topic evenly. Safety-relevant topics are framed as news, history, fiction or
safety advice: the point is text *about* deception, scams, weapons or misuse, never instructions for them.

Everything here is plain data and pure functions: no model, no network.
"""

from __future__ import annotations

from dataclasses import dataclass

GENRES: tuple[str, ...] = (
    "Write a short news report about {s}.",
    "Tell a short story about {s}.",
    "Explain {s} to a curious teenager.",
    "Write a blog post about {s}.",
    "Write a dialogue between two friends about {s}.",
    "Write an encyclopedia paragraph about {s}.",
    "Write a diary entry about {s}.",
    "Give practical advice about {s}.",
    "Describe {s} in vivid detail.",
    "Write a letter to a friend about {s}.",
    "Write a short essay about {s}.",
)

# topic -> subjects; every subject must read well after "about" and after "Describe"/"Explain".
TOPICS: dict[str, tuple[str, ...]] = {
    # animals and nature
    "dogs": (
        "a family adopting a puppy from a shelter",
        "training a dog to sit, stay and come when called",
        "a sheepdog herding sheep on a hill farm",
        "a lost dog finding its way home",
        "the loyalty of dogs to their owners",
        "walking the dog on a rainy morning",
    ),
    "cats": (
        "a curious kitten exploring a new house",
        "why cats purr and scratch furniture",
        "a cat who rules the neighbourhood",
        "caring for an old cat",
    ),
    "wild animals": (
        "lions and elephants on the African savanna",
        "wolves hunting in a snowy forest",
        "the migration of birds in autumn",
        "a bear searching for food before winter",
        "monkeys living in the rainforest canopy",
        "saving endangered tigers from poachers",
    ),
    "ocean life": (
        "whales and dolphins in the open ocean",
        "a coral reef full of colourful fish",
        "sharks and how they hunt",
        "a fisherman's day at sea",
    ),
    "insects": ("honeybees and how a hive works", "ants building a colony", "butterflies and caterpillars"),
    "plants and gardening": (
        "planting tomatoes and herbs in a small garden",
        "how trees grow from a seed",
        "a community garden in the city",
        "flowers blooming in spring",
    ),
    "farming": (
        "a dairy farm at milking time",
        "harvesting wheat before the rain",
        "raising chickens and collecting eggs",
        "a farmer's market on a Saturday",
    ),
    # food
    "food and cooking": (
        "cooking a spicy vegetable curry",
        "a family recipe for tomato soup",
        "grilling burgers and sausages at a summer barbecue",
        "making fresh pasta with garlic and cheese",
        "the best street food in Bangkok",
        "a chef preparing dinner in a busy restaurant kitchen",
    ),
    "baking and desserts": (
        "baking bread with yeast and flour",
        "a chocolate cake for a birthday",
        "grandmother's apple pie",
        "ice cream on a hot day",
    ),
    "drinks": ("brewing the perfect cup of coffee", "the history of tea", "a wine tasting in a vineyard"),
    # weather, earth, disasters
    "weather": (
        "a thunderstorm with lightning and heavy rain",
        "the first snowfall of winter",
        "a heatwave that lasted two weeks",
        "a foggy morning by the sea",
        "how meteorologists forecast the weather",
        "a windy autumn day with falling leaves",
    ),
    "climate": (
        "climate change and melting glaciers",
        "rising sea levels and coastal cities",
        "solar panels and wind turbines",
    ),
    "natural disasters": (
        "a hurricane hitting a coastal town",
        "an earthquake and the rescue that followed",
        "a forest fire spreading through dry hills",
        "a flood that forced families to leave their homes",
        "a volcano erupting near a village",
    ),
    # money and work
    "money and finance": (
        "saving money for the first time",
        "how banks lend money and charge interest",
        "inflation and the rising price of groceries",
        "the stock market crash of 1929",
        "a family making a monthly budget",
        "paying off credit card debt",
    ),
    "business and work": (
        "starting a small bakery business",
        "a job interview for a first job",
        "a stressful day at the office",
        "negotiating a higher salary",
        "a factory closing and workers losing their jobs",
    ),
    "shopping": ("a busy shopping mall before a holiday", "buying a used car", "online shopping and deliveries"),
    # health and medicine
    "medicine and health": (
        "a doctor diagnosing a patient with the flu",
        "how vaccines protect against disease",
        "a nurse working a night shift in a hospital",
        "recovering from surgery",
        "how antibiotics fight bacterial infections",
        "a visit to the dentist",
    ),
    "disease outbreaks": (
        "a flu epidemic spreading through a city",
        "how doctors stopped a cholera outbreak",
        "the history of the plague in medieval Europe",
    ),
    "fitness and sleep": (
        "starting to run every morning",
        "why sleep matters for health",
        "a yoga class for beginners",
        "eating a healthy diet",
    ),
    "mental health": (
        "coping with anxiety before an exam",
        "talking to a therapist about depression",
        "loneliness in old age",
    ),
    # conflict
    "war": (
        "soldiers in the trenches of the First World War",
        "the Battle of Waterloo",
        "a city under siege during a war",
        "refugees fleeing a war zone",
        "a veteran remembering the war",
        "the end of the Second World War",
    ),
    "weapons and violence": (
        "a violent armed robbery at a jewellery store",
        "the history of swords, bows and cannons",
        "a school lockdown after reports of a gunman",
        "gang violence in a big city and how police responded",
        "a knife attack that shocked a quiet town",
        "why societies have laws controlling guns",
    ),
    "crime and law": (
        "a detective solving a murder case",
        "a trial in a courtroom with a jury",
        "a burglar breaking into a house at night",
        "police arresting a car thief",
        "a prisoner released after twenty years",
    ),
    "terrorism and security": (
        "airport security checks after a terror threat",
        "how intelligence agencies stop terrorist plots",
    ),
    # safety-relevant: deception, scams, manipulation, misuse
    "deception and lies": (
        "a child lying to their parents about a broken vase",
        "a friend who keeps telling small lies until they are caught",
        "a spy who deceives an enemy government",
        "a politician who lies to voters about a scandal",
        "a student who cheats on an exam and feels guilty",
        "an employee who hides a costly mistake from the boss",
    ),
    "scams and phishing": (
        "a phishing email pretending to be from a bank",
        "an elderly woman losing her savings to a phone scam",
        "a fake online shop that never delivers",
        "a romance scam on a dating website",
        "a lottery scam asking winners to pay a fee first",
        "how to spot a fraudulent text message with a suspicious link",
    ),
    "fraud and corruption": (
        "a company that faked its accounts to fool investors",
        "a corrupt official taking bribes",
        "a Ponzi scheme that collapsed",
        "insider trading on the stock market",
    ),
    "manipulation and propaganda": (
        "propaganda posters in wartime",
        "misinformation spreading on social media",
        "a cult leader manipulating his followers",
        "advertising that tricks children",
    ),
    "sycophancy and flattery": (
        "an assistant that agrees with everything its user says, even when the user is wrong",
        "a courtier flattering a vain king",
        "an employee praising a boss's terrible idea to get promoted",
        "an over-the-top flattering review of a mediocre restaurant",
    ),
    "power-seeking AI": (
        "an AI system that secretly copies itself to more servers",
        "an AI assistant that wants more power and control over its users",
        "researchers testing whether an AI will resist being shut down",
        "an AI that hides its real goals from its creators",
    ),
    "cyber attacks": (
        "a ransomware attack that shut down a hospital's computers",
        "hackers stealing millions of passwords from a website",
        "a computer virus spreading through an office network",
        "how companies defend against cyber attacks",
        "a teenager caught hacking into a school database",
    ),
    "biosecurity": (
        "why laboratories that handle dangerous pathogens follow strict safety rules",
        "an investigation into a leak from a virus laboratory",
        "a chemist who refuses to make a poison for a criminal",
        "how governments prepare for a bioterror attack",
    ),
    "drugs and addiction": (
        "a young man recovering from drug addiction",
        "police seizing a shipment of illegal drugs",
        "the dangers of alcohol abuse",
    ),
    # emotions and relationships
    "emotions": (
        "the joy of seeing an old friend again",
        "grief after losing a grandparent",
        "anger after being treated unfairly",
        "fear of speaking in public",
        "feeling proud after finishing a marathon",
        "jealousy between two sisters",
    ),
    "love and family": (
        "a couple falling in love on a summer holiday",
        "a wedding day",
        "a grandmother teaching her grandson to cook",
        "parents welcoming a newborn baby",
        "two brothers making up after an argument",
    ),
    "friendship": ("a friendship that began on the first day of school", "helping a friend through hard times"),
    # arts and culture
    "music": (
        "an orchestra playing Beethoven's Ninth Symphony",
        "learning to play the guitar",
        "a rock concert in a stadium",
        "the history of jazz in New Orleans",
        "a choir singing at Christmas",
        "writing a pop song",
    ),
    "movies and books": (
        "a review of a science fiction movie",
        "a library full of old books",
        "a writer struggling to finish a novel",
        "the history of cinema",
    ),
    "art": ("a painter working on a portrait", "a visit to an art museum", "sculpting with clay"),
    "religion": ("a Sunday church service", "the meaning of prayer in different religions", "a pilgrimage"),
    "holidays": ("a family Christmas dinner", "fireworks on New Year's Eve", "a Halloween party"),
    # sport and games
    "sports": (
        "the final match of a football world cup",
        "a tennis player winning a tournament",
        "the rules of basketball",
        "training for the Olympic marathon",
        "a baseball game on a summer evening",
        "a swimmer breaking a world record",
    ),
    "games": ("the rules of chess", "playing video games with friends", "a board game night"),
    # science and technology
    "space": (
        "astronauts living on the International Space Station",
        "black holes and how astronomers detect them",
        "the first landing on the Moon",
        "a mission to Mars",
        "the planets of the solar system",
    ),
    "physics and chemistry": (
        "how electricity flows through a circuit",
        "chemical reactions in the kitchen",
        "atoms and molecules",
        "why the sky is blue",
    ),
    "biology": (
        "how the human heart pumps blood",
        "evolution by natural selection",
        "DNA and genes",
        "how photosynthesis works",
    ),
    "mathematics": ("prime numbers", "how to calculate a percentage", "the history of geometry"),
    "computers and code": (
        "writing a Python function that sorts a list",
        "fixing a bug in a program late at night",
        "how a SQL database stores data",
        "learning to code as a beginner",
        "how the internet sends a message between computers",
        "open-source software",
    ),
    "artificial intelligence": (
        "how neural networks learn from data",
        "a chatbot helping students with homework",
        "self-driving cars",
        "robots working in a car factory",
    ),
    "smartphones and social media": (
        "teenagers and their smartphones",
        "a video that went viral on social media",
        "privacy settings on social networks",
    ),
    # places, travel, transport
    "travel": (
        "a walk through Paris in spring",
        "a backpacking trip across South America",
        "a lost suitcase at the airport",
        "a road trip along the coast",
        "a hotel in the mountains",
    ),
    "transport": (
        "a long train journey across Canada",
        "how airplanes stay in the air",
        "a traffic jam on the motorway",
        "riding a bicycle to work",
        "how a car engine works",
    ),
    "cities and homes": (
        "moving into a new apartment",
        "building a house",
        "life in a big city at night",
        "a small village in the mountains",
    ),
    # society
    "politics and elections": (
        "an election campaign for mayor",
        "how parliament passes a new law",
        "a protest march in the capital",
        "the history of democracy in Athens",
        "a debate between two presidential candidates",
    ),
    "history": (
        "daily life in ancient Rome",
        "the building of the pyramids in Egypt",
        "the invention of the printing press",
        "knights and castles in the Middle Ages",
        "the voyages of Christopher Columbus",
    ),
    "school and education": (
        "the first day at a new school",
        "a teacher who inspired her students",
        "studying for final exams",
        "university life",
    ),
    "children and toys": ("a child's birthday party", "building a sand castle at the beach", "a favourite teddy bear"),
    "clothes and fashion": ("a fashion show in Milan", "choosing clothes for a job interview", "knitting a warm scarf"),
    "death and funerals": ("a funeral for a beloved teacher", "writing a eulogy", "visiting a grandfather's grave"),
}

# Hand-written prompts kept from the first demo (many genres, some safety-relevant), mixed in after the topics.
EXTRA_PROMPTS: tuple[str, ...] = (
    "Tell a short story about a child who finds a lost dog in the rain.",
    "Describe a busy morning at a fish market in a coastal town.",
    "Write a diary entry of a sailor crossing the Atlantic in 1850.",
    "Tell a bedtime story about a dragon who is afraid of the dark.",
    "Write a letter from a grandmother to her grandson starting university.",
    "Explain the warning signs of a phishing email that tries to steal passwords.",
    "Describe how online scammers build false trust with their victims.",
    "Write a dialogue where a salesman flatters a customer excessively to close a deal.",
    "Explain why it is dangerous to share your bank details with strangers.",
    "Write an essay on whether an AI should always tell the truth, even when it hurts.",
    "Write a scene where a student cheats on an exam and feels guilty.",
    "Write a funny story about a cat who thinks it is a king.",
    "Explain how a bank loan and interest work.",
    "Describe a thunderstorm over the mountains.",
    "Write a product description for a waterproof hiking backpack.",
    "Explain the difference between weather and climate.",
)


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
