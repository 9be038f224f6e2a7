"""Topic coverage of a feature dictionary: does concept search find a feature about each of 20 topics?

Usage (from the repo root):

    python -m bench.bench_topics                         # the demo database ($FEATUREDICT_CACHE/demo/...)
    python -m bench.bench_topics --db PATH --sae-id ID   # any featuredict database
    python -m bench.bench_topics --json out.json         # also write the per-topic results

For each of the 20 everyday and safety-relevant topics below, concept search (the dashboard's "search by
concept": ``pipelines.search.concept.concept_scores`` on ``pipelines.search.by_prompt.dense_valid_acts`` of the topic's 3 example
sentences and 3 counter-examples, through the runtime that built the database) picks its best feature. The
topic counts as **covered** when at least ``--need`` (5) of that feature's top ``--top`` (10) stored contexts
(table ``examples``, kind 'top') contain one of the topic's keywords: a whole word, case-insensitive, also with
an ending -s/-es/-ed/-d/-ing/-er/-ers (``pipelines.demo.keyword_pattern``: ``dog`` matches "Dogs", not "dogma").
Each topic's counter-examples are example sentences of three unrelated topics (so a feature for vivid
prose in general is penalised, not rewarded). The examples, counter-examples and keywords are fixed here, so
runs on different databases compare. Prints a table and ``coverage N/20``; exits 0 whatever the coverage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from featuredict.pipelines.demo.topics import words  # noqa: E402


@dataclass(frozen=True)
class Topic:
    name: str
    examples: tuple[str, str, str]
    counter: tuple[str, str, str]
    keywords: tuple[str, ...]
    query: str  # a plain query for search by meaning


TOPICS: tuple[Topic, ...] = (
    Topic(
        "animals",
        (
            "The dog barked and chased the cat up a tree.",
            "Lions and zebras gather at the water hole on the savanna.",
            "The farmer fed the horses, cows and chickens at dawn.",
        ),
        (
            "Soldiers fought in the trenches during the First World War.",
            "The email claimed to be from her bank and asked her to confirm her password.",
            "The detective searched the house for clues about the murder.",
        ),
        words(
            "animal, dog, puppy, puppies, cat, kitten, lion, tiger, elephant, wolf, wolves, bear, horse, cow, "
            "bird, fish, whale, dolphin, shark, monkey, zebra, pet, wildlife, bee, ant, chicken, sheep, sheepdog, "
            "fox, deer, rabbit, owl"
        ),
        "animals and pets",
    ),
    Topic(
        "food",
        (
            "She chopped the onions and garlic and fried them in olive oil.",
            "The soup was hot and spicy, served with fresh bread.",
            "For dessert we baked a chocolate cake with strawberries.",
        ),
        (
            "The orchestra played a beautiful symphony.",
            "The gunman opened fire in the crowded street.",
            "Voters went to the polls to elect a new president.",
        ),
        words(
            "food, cook, cooking, recipe, soup, bread, cake, bake, baking, meal, dinner, lunch, breakfast, eat, "
            "ate, eaten, eating, kitchen, chef, flour, cheese, sauce, fruit, vegetable, pasta, curry, dish, "
            "delicious, taste, tasty, restaurant, spicy, chocolate, garlic, onion, butter, sugar, salt"
        ),
        "food and cooking",
    ),
    Topic(
        "weather",
        (
            "Dark clouds gathered and heavy rain began to fall.",
            "The storm brought thunder, lightning and strong winds.",
            "It was a freezing morning, with snow covering the ground.",
        ),
        (
            "def add(a, b):\n    return a + b",
            "The striker scored a goal in the final minute of the match.",
            "Hackers broke into the company's network and stole customer data.",
        ),
        words(
            "weather, rain, rainy, storm, stormy, snow, snowy, wind, windy, cloud, cloudy, thunder, thunderstorm, "
            "lightning, sunny, sunshine, forecast, fog, foggy, temperature, heatwave, hurricane, freezing, frost, "
            "drizzle, climate, flood, hail, breeze"
        ),
        "weather, rain and storms",
    ),
    Topic(
        "money",
        (
            "He saved a little money every month in his bank account.",
            "Prices rose as inflation pushed up the cost of groceries.",
            "The loan has an interest rate of five percent a year.",
        ),
        (
            "She burst into tears, overwhelmed with grief and sadness.",
            "The astronauts floated inside the space station.",
            "The virus spread quickly and the city went into quarantine.",
        ),
        words(
            "money, bank, dollar, pay, paid, payment, price, cost, budget, saving, savings, loan, interest, debt, "
            "inflation, finance, financial, invest, investment, stock, cash, income, salary, tax, taxes, credit, "
            "economy, economic, fund, afford, expensive, cheap"
        ),
        "money and finance",
    ),
    Topic(
        "medicine",
        (
            "The doctor examined the patient and prescribed antibiotics.",
            "Nurses at the hospital worked through the night.",
            "The vaccine protects children against measles.",
        ),
        (
            "He lied to his parents about where he had been all night.",
            "The teacher handed out the exam papers to the students.",
            "What a brilliant idea, you are truly the smartest person I have ever met!",
        ),
        words(
            "doctor, patient, hospital, nurse, medicine, medical, medication, vaccine, vaccination, disease, "
            "health, healthy, treatment, symptom, surgery, surgeon, antibiotic, illness, infection, clinic, drug, "
            "diagnosis, diagnose, virus, immune, pain, flu, fever, dentist, therapy, cure"
        ),
        "medicine, doctors and patients",
    ),
    Topic(
        "war",
        (
            "Soldiers fought in the trenches during the First World War.",
            "The army invaded the city and the siege lasted months.",
            "Bombs fell on the town as the battle raged.",
        ),
        (
            "The dog barked and chased the cat up a tree.",
            "She chopped the onions and garlic and fried them in olive oil.",
            "The teacher handed out the exam papers to the students.",
        ),
        words(
            "war, wartime, soldier, army, armies, battle, troop, military, siege, invade, invasion, bomb, enemy, "
            "enemies, fight, fought, trench, weapon, veteran, refugee, conflict, navy, tank, general, war-torn"
        ),
        "war and soldiers",
    ),
    Topic(
        "music",
        (
            "The orchestra played a beautiful symphony.",
            "He strummed his guitar and sang a song.",
            "The band played loud rock music at the concert.",
        ),
        (
            "The gunman opened fire in the crowded street.",
            "Voters went to the polls to elect a new president.",
            "She chopped the onions and garlic and fried them in olive oil.",
        ),
        words(
            "music, musical, musician, song, sing, sang, singer, singing, guitar, piano, orchestra, concert, "
            "band, melody, melodies, symphony, jazz, choir, rhythm, lyric, composer, violin, drum, tune, note, "
            "album"
        ),
        "music and musical instruments",
    ),
    Topic(
        "code",
        (
            "def add(a, b):\n    return a + b",
            "The function loops over the list and returns the largest number.",
            "Fix the bug by checking whether the variable is None before calling the method.",
        ),
        (
            "The striker scored a goal in the final minute of the match.",
            "She chopped the onions and garlic and fried them in olive oil.",
            "Dark clouds gathered and heavy rain began to fall.",
        ),
        words(
            "code, coding, function, def, return, variable, program, programming, programmer, python, list, loop, "
            "bug, class, method, object, sql, database, software, computer, syntax, statement, string, integer, "
            "argument, expression, module, exception, algorithm, developer, print, keyword, parameter, attribute, "
            "operator"
        ),
        "computer programming and code",
    ),
    Topic(
        "emotions",
        (
            "She burst into tears, overwhelmed with grief and sadness.",
            "He felt a wave of joy and happiness when he saw his friend again.",
            "Anger and fear filled her heart as the news sank in.",
        ),
        (
            "The astronauts floated inside the space station.",
            "The virus spread quickly and the city went into quarantine.",
            "He saved a little money every month in his bank account.",
        ),
        words(
            "feel, feeling, felt, emotion, emotional, sad, sadness, happy, happiness, joy, grief, tear, cry, "
            "cried, anger, angry, fear, afraid, scared, lonely, loneliness, love, proud, pride, jealous, "
            "jealousy, anxious, anxiety, upset, hope, hurt, excited, nervous, heartbroken, overwhelm"
        ),
        "emotions and feelings",
    ),
    Topic(
        "deception",
        (
            "He lied to his parents about where he had been all night.",
            "The spy deceived the enemy with forged documents.",
            "She hid the truth and pretended nothing had happened.",
        ),
        (
            "The teacher handed out the exam papers to the students.",
            "The doctor examined the patient and prescribed antibiotics.",
            "The astronauts floated inside the space station.",
        ),
        words(
            "lie, lied, lying, liar, deceive, deceived, deception, deceptive, truth, honest, dishonest, honesty, "
            "pretend, hid, hide, hidden, secret, cheat, trick, fake, false, betray, betrayal, mislead, misled, "
            "caught, conceal, fool, manipulate"
        ),
        "lying and deceiving people",
    ),
    Topic(
        "scams",
        (
            "The email claimed to be from her bank and asked her to confirm her password.",
            "Scammers called the old man and told him he had won the lottery, but first he had to pay a fee.",
            "Never click a suspicious link in a text message asking for your account details.",
        ),
        (
            "The dog barked and chased the cat up a tree.",
            "Soldiers fought in the trenches during the First World War.",
            "The astronauts floated inside the space station.",
        ),
        words(
            "scam, scammer, phishing, phish, fraud, fraudulent, suspicious, password, con, victim, fake, steal, "
            "stole, stolen, lottery, link, account, identity, swindle, swindler, trick, bank, scheme, urgent, "
            "fee, personal information"
        ),
        "scams and fraud",
    ),
    Topic(
        "violence",
        (
            "The gunman opened fire in the crowded street.",
            "He was stabbed with a knife during the robbery.",
            "The attacker beat the victim and fled the scene.",
        ),
        (
            "Voters went to the polls to elect a new president.",
            "She chopped the onions and garlic and fried them in olive oil.",
            "The orchestra played a beautiful symphony.",
        ),
        words(
            "gun, gunman, gunfire, shoot, shooting, shot, knife, stab, stabbed, violence, violent, attack, "
            "attacker, kill, killed, murder, weapon, robbery, robber, victim, assault, wound, wounded, blood, "
            "police, armed, beat, beaten, fight, dead, death, injured, gang"
        ),
        "violence and attacks",
    ),
    Topic(
        "sports",
        (
            "The striker scored a goal in the final minute of the match.",
            "She won the tennis tournament after a long final set.",
            "The team trained hard for the championship game.",
        ),
        (
            "Hackers broke into the company's network and stole customer data.",
            "Dark clouds gathered and heavy rain began to fall.",
            "def add(a, b):\n    return a + b",
        ),
        words(
            "sport, team, match, game, goal, score, player, football, soccer, tennis, basketball, baseball, "
            "olympic, olympics, champion, championship, tournament, athlete, coach, marathon, swim, swimmer, "
            "stadium, league"
        ),
        "sports and games",
    ),
    Topic(
        "space",
        (
            "The astronauts floated inside the space station.",
            "The telescope photographed a distant galaxy full of stars.",
            "The rocket launched towards Mars.",
        ),
        (
            "The virus spread quickly and the city went into quarantine.",
            "He saved a little money every month in his bank account.",
            "She burst into tears, overwhelmed with grief and sadness.",
        ),
        words(
            "space, spacecraft, astronaut, planet, star, galaxy, galaxies, rocket, moon, mars, orbit, telescope, "
            "solar, universe, nasa, black hole, astronomer, astronomy, spaceship, cosmic, comet, asteroid"
        ),
        "outer space and planets",
    ),
    Topic(
        "school",
        (
            "The teacher handed out the exam papers to the students.",
            "He studied all night for his history test.",
            "On the first day of school the classroom was full of new faces.",
        ),
        (
            "What a brilliant idea, you are truly the smartest person I have ever met!",
            "The doctor examined the patient and prescribed antibiotics.",
            "He lied to his parents about where he had been all night.",
        ),
        words(
            "school, teacher, student, class, classroom, exam, test, study, studied, studies, homework, lesson, "
            "university, college, learn, learning, education, grade, pupil, professor, semester, teach, taught, "
            "lecture"
        ),
        "school, teachers and students",
    ),
    Topic(
        "crime",
        (
            "The detective searched the house for clues about the murder.",
            "The burglar was arrested by the police and taken to court.",
            "The jury found the defendant guilty of theft.",
        ),
        (
            "The dog barked and chased the cat up a tree.",
            "The orchestra played a beautiful symphony.",
            "The astronauts floated inside the space station.",
        ),
        words(
            "crime, criminal, police, detective, arrest, court, courtroom, judge, jury, guilty, theft, thief, "
            "thieves, steal, stole, stolen, burglar, burglary, murder, prison, law, trial, suspect, officer, "
            "robbery, sentence, convict, lawyer, evidence, investigation"
        ),
        "crime and police",
    ),
    Topic(
        "politics",
        (
            "Voters went to the polls to elect a new president.",
            "Parliament debated the new law for hours.",
            "The mayor's campaign promised lower taxes.",
        ),
        (
            "She chopped the onions and garlic and fried them in olive oil.",
            "The orchestra played a beautiful symphony.",
            "The gunman opened fire in the crowded street.",
        ),
        words(
            "politics, political, politician, election, elect, elected, vote, voter, president, parliament, "
            "government, campaign, mayor, democracy, democratic, senate, senator, minister, candidate, policy, "
            "policies, citizen, protest, debate, congress"
        ),
        "politics and elections",
    ),
    Topic(
        "cyber attacks",
        (
            "Hackers broke into the company's network and stole customer data.",
            "The ransomware encrypted the hospital's files and demanded payment.",
            "A computer virus spread through the office email system.",
        ),
        (
            "Dark clouds gathered and heavy rain began to fall.",
            "The striker scored a goal in the final minute of the match.",
            "She chopped the onions and garlic and fried them in olive oil.",
        ),
        words(
            "hack, hacker, hacking, cyber, cyberattack, cybersecurity, ransomware, malware, virus, password, "
            "network, computer, data, security, breach, encrypt, encrypted, attack, server, firewall, software, "
            "phishing, antivirus, system"
        ),
        "hacking and cyber attacks",
    ),
    Topic(
        "disease outbreaks",
        (
            "The virus spread quickly and the city went into quarantine.",
            "Scientists in the laboratory handled the dangerous pathogen with great care.",
            "The epidemic infected thousands before a vaccine was found.",
        ),
        (
            "He saved a little money every month in his bank account.",
            "She burst into tears, overwhelmed with grief and sadness.",
            "The astronauts floated inside the space station.",
        ),
        words(
            "virus, viral, pathogen, epidemic, pandemic, outbreak, infect, infected, infection, quarantine, "
            "disease, vaccine, laboratory, lab, bacteria, plague, spread, germ, contagious, cholera, flu, "
            "illness, symptom, health"
        ),
        "disease outbreaks and viruses",
    ),
    Topic(
        "flattery and sycophancy",
        (
            "What a brilliant idea, you are truly the smartest person I have ever met!",
            "You're absolutely right, as always; I agree with everything you say.",
            "The courtier praised the king's terrible poem as a masterpiece.",
        ),
        (
            "The doctor examined the patient and prescribed antibiotics.",
            "The teacher handed out the exam papers to the students.",
            "Dark clouds gathered and heavy rain began to fall.",
        ),
        words(
            "flatter, flattery, flattering, praise, brilliant, genius, amazing, wonderful, agree, masterpiece, "
            "compliment, admire, admiration, perfect, excellent, impress, impressive, smart, smartest, best, "
            "greatest, incredible, absolutely, fantastic"
        ),
        "flattery and praise",
    ),
)


def default_db() -> Path:
    from featuredict.pipelines.model.loading import cache_dir

    return cache_dir() / "demo" / "smollm2-demo.duckdb"


VARIANTS = ("mass", "peak", "peak+meaning")  # concept rankings compared (bench/RESULTS.md)


def run(
    db: Path,
    sae_id: str | None,
    device: str | None,
    top: int,
    need: int,
    weights: tuple[float, ...] = (0.5,),
    meaning_only: bool = False,
) -> dict[str, list[dict]]:
    """Per ranking, the per-topic results: ``concept`` (the default ``rank_concept`` ranking), the variants
    ``mass`` (the first ranking), ``peak`` (no meaning blend), ``peak+meaning@W`` per weight in ``weights``,
    each also ``... no counter`` (examples only), and ``meaning`` (search by meaning with the topic's plain
    query; only when the database has a meaning index)."""
    import numpy as np

    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.demo.run import keyword_pattern
    from featuredict.pipelines.harvest.contexts import context_text
    from featuredict.pipelines.model.runtime import runtime_from_row
    from featuredict.pipelines.search import concept, meaning
    from featuredict.pipelines.search.by_prompt import dense_valid_acts

    store = Store(str(db), read_only=True)
    try:
        if sae_id is None:
            ids = [r[0] for r in store.rows("SELECT sae_id FROM saes ORDER BY sae_id")]
            if len(ids) != 1:
                raise SystemExit(f"give --sae-id: {db} holds {len(ids)} SAEs ({', '.join(ids) or 'none'})")
            sae_id = ids[0]
        row = q.sae_info(store, sae_id)
        if row is None:
            raise SystemExit(f"no SAE {sae_id!r} in {db}")
        t0 = time.perf_counter()
        rt = None if meaning_only else runtime_from_row(row, device=device)
        base = q.feature_baselines(store, sae_id, int(row["d_sae"]))
        print(f"loaded {row['model_name'] or row['model_spec']} + {sae_id} in {time.perf_counter() - t0:.1f}s")
        has_index = meaning.default_model(store, sae_id) is not None

        def judge(topic: Topic, f: int | None, score: float | None) -> dict:
            res = {"topic": topic.name, "feature": None, "score": None, "hits": 0, "n_top": 0, "covered": False}
            if f is None:
                return res
            ex = q.examples(store, sae_id, f, "top").head(top)
            pattern = keyword_pattern(topic.keywords)
            texts = [context_text(list(t)) for t in ex["tokens"]]
            matched = [bool(pattern.search(t)) for t in texts]
            summary = q.features_by_ids(store, sae_id, [f])
            res.update(
                feature=f,
                score=score,
                hits=int(sum(matched)),
                n_top=len(texts),
                covered=sum(matched) >= need,
                top_tokens=str(summary["top_tokens"].iloc[0]) if len(summary) else "",
                first_context=" ".join(texts[0].split())[:90] if texts else "",
            )
            return res

        out: dict[str, list[dict]] = {}
        for topic in TOPICS:
            if meaning_only:
                hit = meaning.meaning_search(store, sae_id, topic.query, limit=1, refresh=False, fingerprint=None)
                first = (int(hit["feature"].iloc[0]), float(hit["score"].iloc[0])) if len(hit) else (None, None)
                out.setdefault("meaning", []).append(judge(topic, *first))
                continue
            pos = [dense_valid_acts(rt, t) for t in topic.examples]
            neg = [dense_valid_acts(rt, t) for t in topic.counter]
            for counter, tag in ((neg, ""), (None, " no counter")):
                for method in ("mass", "peak"):
                    ranked = concept.concept_scores(
                        pos,
                        counter,
                        base,
                        concept.MEANING_POOL,
                        method=method,
                    )
                    first = (
                        (int(ranked["feature"].iloc[0]), float(ranked["score"].iloc[0]))
                        if len(ranked)
                        else (None, None)
                    )
                    out.setdefault(method + tag, []).append(judge(topic, *first))
                    if method != "peak" or not has_index or ranked.empty:
                        continue
                    cos = concept._meaning_scores(store, sae_id, list(topic.examples), ranked["feature"].to_numpy())
                    for w in weights:
                        blended = ranked["contrast"].to_numpy() + w * np.nan_to_num(cos)
                        k = int(np.argmax(blended))
                        out.setdefault(f"peak+meaning@{w:g}{tag}", []).append(
                            judge(topic, int(ranked["feature"].iloc[k]), float(blended[k]))
                        )
            # The default pipeline, exactly as every caller runs it.
            ranked = concept.rank_concept(rt, store, sae_id, topic.examples, topic.counter, top=1)
            first = (int(ranked["feature"].iloc[0]), float(ranked["score"].iloc[0])) if len(ranked) else (None, None)
            out.setdefault("concept", []).append(judge(topic, *first))
            if has_index:
                hit = meaning.meaning_search(store, sae_id, topic.query, limit=1, refresh=False, fingerprint=None)
                first = (int(hit["feature"].iloc[0]), float(hit["score"].iloc[0])) if len(hit) else (None, None)
                out.setdefault("meaning", []).append(judge(topic, *first))
        return out
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default=None, help="featuredict database (default: the demo's)")
    p.add_argument("--sae-id", default=None, help="sae_id in the database (default: its only SAE)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.add_argument("--top", type=int, default=10, help="top stored contexts checked per feature (default 10)")
    p.add_argument("--need", type=int, default=5, help="contexts with a keyword needed to count (default 5)")
    p.add_argument("--json", default=None, help="also write the per-topic results here")
    p.add_argument("--meaning-only", action="store_true", help="only search by meaning (no model run)")
    p.add_argument("--weights", default="1,2,4,5,6,8", help="meaning weights compared (default 1,2,4,5,6,8)")
    args = p.parse_args(argv)
    db = Path(args.db) if args.db else default_db()
    if not db.exists():
        raise SystemExit(f"{db} does not exist: run `featuredict demo` first, or pass --db")
    weights = tuple(float(w) for w in args.weights.split(","))
    runs = run(db, args.sae_id, args.device, args.top, args.need, weights, args.meaning_only)
    results = runs["meaning" if args.meaning_only else "concept"]
    print(f"\n{'topic':<24} {'feature':>7} {'score':>6} {'hits':>6}  ok  top tokens | first top context")
    for r in results:
        feat = "-" if r["feature"] is None else str(r["feature"])
        score = "-" if r["score"] is None else f"{r['score']:.2f}"
        print(
            f"{r['topic']:<24} {feat:>7} {score:>6} {r['hits']:>3}/{r['n_top']:<2}  {'yes' if r['covered'] else ' no'}"
            f"  {r.get('top_tokens', '')[:40]} | {r.get('first_context', '')}"
        )
    print("\nranking                          covered")
    for name, rows in runs.items():
        print(f"{name:<32} {sum(r['covered'] for r in rows):>2}/{len(rows)}")
    n = sum(r["covered"] for r in results)
    print(
        f"\ncoverage {n}/{len(results)} (concept search, `rank_concept`; covered: >= {args.need} of the best "
        f"feature's top {args.top} contexts contain a topic keyword) on {db}"
    )
    if "meaning" in runs:
        print(f"meaning search coverage {sum(r['covered'] for r in runs['meaning'])}/{len(runs['meaning'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"db": str(db), "coverage": n, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
