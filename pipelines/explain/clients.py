"""Chat backends that write and score explanations: a registry name -> class, picked by a spec string.

- ``openai:URL``: any OpenAI-compatible chat-completions endpoint (``URL`` is the base, e.g.
  ``http://localhost:8000/v1``, or the full ``.../chat/completions``), with ``--model NAME``. The API key comes
  from an environment variable (``FEATUREDICT_API_KEY``, else ``OPENAI_API_KEY``; none for a local server). It is
  sent as a Bearer header and never stored, printed or put in an error message. Safe to call from many threads.
- ``hf:MODEL``: a Hugging Face instruct model in this process (the preset ``smollm2-135m``, a local folder or a
  hub id), prompted through its chat template; fp32 on CPU. One generation at a time (a lock).

Every call takes a ``parse`` function that turns the answer text into a value or raises ``BadAnswer``. Rate
limits (429), server errors (5xx), timeouts, dropped connections, malformed JSON bodies, empty answers and
answers ``parse`` rejects are retried with exponential backoff (``Retry-After`` honoured, capped); after the
last try the call raises ``ChatError`` with one line. Answers that retrying cannot fix (401/403/404, and other
4xx) raise ``ChatFatal`` at once: the run stops instead of failing every feature the same way.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar, cast

from featuredict.db.errors import UserError, one_line

T = TypeVar("T")
Messages = list[dict[str, str]]
API_KEY_ENVS = ("FEATUREDICT_API_KEY", "OPENAI_API_KEY")


class ChatError(UserError, RuntimeError):
    """A call that still failed after every retry (one line)."""


class ChatFatal(ChatError):
    """A failure no retry can fix (bad key, wrong URL or model); the run should stop."""


class BadAnswer(ValueError):
    """An answer that does not have the asked-for form (retried)."""


@dataclass(frozen=True)
class ChatSettings:
    """How to call a backend: retries, backoff, timeout and sampling.

    ``retries``: extra tries after the first. ``backoff_s``: first wait, doubled per retry with jitter, capped
    at ``max_backoff_s``. ``timeout_s``: per HTTP request. ``temperature`` 0 = greedy (for ``hf:``, retries of a
    rejected answer sample at 0.7 so they can differ). ``concurrency``: parallel calls (``openai:`` only).
    """

    retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    temperature: float = 0.0
    concurrency: int = 4
    device: str | None = None
    api_key_env: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 20:
            raise ValueError(f"retries must be 0..20; got {self.retries}")
        if not (self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ValueError("backoff must be >= 0 seconds")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {self.timeout_s}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be 0..2; got {self.temperature}")
        if not 1 <= self.concurrency <= 256:
            raise ValueError(f"concurrency must be 1..256; got {self.concurrency}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ValueError(f"threads must be >= 1; got {self.threads}")


class ChatBackend(Protocol):
    kind: ClassVar[str]
    model: str  # what explanations record as explainer_model / scorer_model
    parallel: int  # how many calls may run at once

    def complete(
        self, messages: Messages, max_tokens: int, parse: Callable[[str], T], avoid_repeats: bool = False
    ) -> tuple[T, int]:
        """``(parse(answer), tokens used by every try)``; raises ChatError / ChatFatal. ``avoid_repeats``: free
        text, where a small model must not loop (``hf:`` blocks repeated 4-grams; remote models ignore it)."""
        ...


def _wait(settings: ChatSettings, attempt: int, retry_after: float | None = None) -> None:
    if retry_after is not None:
        delay = min(max(retry_after, 0.0), settings.max_backoff_s)
    else:
        delay = min(settings.backoff_s * (2**attempt), settings.max_backoff_s) * (0.5 + random.random() / 2)
    if delay > 0:
        time.sleep(delay)


class OpenAIChat:
    """An OpenAI-compatible ``/chat/completions`` endpoint over HTTP (stdlib only; thread-safe)."""

    kind: ClassVar[str] = "openai"

    def __init__(self, target: str, model: str | None, settings: ChatSettings):
        if not target.startswith(("http://", "https://")):
            raise ValueError(f"openai: needs an http(s) URL, e.g. openai:http://localhost:8000/v1; got {target!r}")
        if not model:
            raise ValueError("openai: needs --model NAME (the model the endpoint serves)")
        base = target.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.settings = settings
        self.parallel = settings.concurrency
        names = (settings.api_key_env,) if settings.api_key_env else API_KEY_ENVS
        self._key = next((os.environ[n] for n in names if os.environ.get(n)), None)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request; returns the decoded JSON body. Raises urllib/socket errors, BadAnswer on a bad body."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.settings.timeout_s) as r:  # noqa: S310 - user-given URL
            raw = r.read()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            shown = one_line(raw.decode(errors="replace"), 80)
            raise BadAnswer(f"malformed JSON from the endpoint: {shown!r}") from None
        if not isinstance(data, dict):
            raise BadAnswer("the endpoint answered JSON that is not an object")
        return data

    def complete(
        self, messages: Messages, max_tokens: int, parse: Callable[[str], T], avoid_repeats: bool = False
    ) -> tuple[T, int]:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": int(max_tokens),
            "temperature": self.settings.temperature,
        }
        used = 0
        last = "no answer"
        for attempt in range(self.settings.retries + 1):
            retry_after: float | None = None
            try:
                data = self._post(body)
                usage = data.get("usage") or {}
                if isinstance(usage, dict):
                    total = usage.get("total_tokens")
                    if total is None:
                        total = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
                    used += int(total or 0)
                try:
                    text = data["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    raise BadAnswer("the endpoint's answer has no choices[0].message.content") from None
                if not isinstance(text, str) or not text.strip():
                    raise BadAnswer("empty answer")
                return parse(text), used
            except urllib.error.HTTPError as e:
                detail = ""
                try:
                    detail = one_line(e.read().decode(errors="replace"), 120)
                except Exception:  # noqa: BLE001 - the body is only a hint
                    pass
                last = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                if e.code in (401, 403):
                    raise ChatFatal(
                        self._scrub(f"{self.url} answered {last}; check the API key in ${'/$'.join(API_KEY_ENVS)}")
                    ) from None
                if e.code != 429 and e.code < 500:
                    raise ChatFatal(self._scrub(f"{self.url} answered {last} (model {self.model!r})")) from None
                ra = e.headers.get("Retry-After") if e.headers else None
                try:
                    retry_after = float(ra) if ra is not None else None
                except ValueError:
                    retry_after = None
            except TimeoutError:
                last = f"timed out after {self.settings.timeout_s:g}s"
            except urllib.error.URLError as e:
                reason = e.reason
                last = (
                    f"timed out after {self.settings.timeout_s:g}s"
                    if isinstance(reason, TimeoutError)
                    else f"cannot reach {self.url}: {reason}"
                )
            except (ConnectionError, OSError) as e:  # reset / dropped connection mid-answer
                last = f"connection error: {type(e).__name__}: {one_line(e, 100)}"
            except BadAnswer as e:
                last = str(e)
            if attempt < self.settings.retries:
                _wait(self.settings, attempt, retry_after)
        raise ChatError(self._scrub(f"{last} (after {self.settings.retries + 1} tries)"))


class HFChat:
    """A Hugging Face instruct model generating in this process through its chat template (fp32 on CPU)."""

    kind: ClassVar[str] = "hf"
    parallel = 1

    def __init__(self, target: str, model: str | None, settings: ChatSettings):
        if not target:
            raise ValueError("hf: needs a model: hf:smollm2-135m, hf:FOLDER or hf:HUB_ID")
        self.model = target
        self.settings = settings
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any] | None = None

    def load(self) -> tuple[Any, Any, Any]:
        """Load the model and tokenizer once (raises ModelLoadError with one line)."""
        if self._loaded is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from featuredict.pipelines.model.loading import ModelLoadError, pick_device, resolve_dtype, resolve_hf_path

            dev = pick_device(self.settings.device)
            path = resolve_hf_path(self.model)
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as e:  # noqa: BLE001 - any loader failure is one line
                raise ModelLoadError(f"cannot load explainer model {self.model!r}: {one_line(e, 200)}") from e
            if not getattr(tok, "chat_template", None):
                raise ModelLoadError(f"{self.model!r} has no chat template (give an instruct model)")
            try:
                loaded = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(None, dev))
                lm = cast(Any, cast(torch.nn.Module, loaded).to(dev).eval())
            except Exception as e:  # noqa: BLE001 - any loader failure is one line
                raise ModelLoadError(f"cannot load explainer model {self.model!r}: {one_line(e, 200)}") from e
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            self._loaded = (tok, lm, dev)
        return self._loaded

    def complete(
        self, messages: Messages, max_tokens: int, parse: Callable[[str], T], avoid_repeats: bool = False
    ) -> tuple[T, int]:
        import torch

        with self._lock:
            tok, lm, dev = self.load()
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(dev)
            n_in = int(enc["input_ids"].shape[1])
            used = 0
            last = "no answer"
            for attempt in range(self.settings.retries + 1):
                sample = self.settings.temperature > 0 or attempt > 0
                kw: dict[str, Any] = {"do_sample": sample, "max_new_tokens": int(max_tokens)}
                if avoid_repeats:
                    kw["no_repeat_ngram_size"] = 4
                if sample:
                    torch.manual_seed(attempt)
                    kw.update(temperature=self.settings.temperature or 0.7, top_p=0.95)
                else:
                    kw.update(temperature=None, top_p=None, top_k=None)
                with torch.inference_mode():
                    out = lm.generate(**enc, pad_token_id=tok.pad_token_id or tok.eos_token_id, **kw)
                new = out[0, n_in:]
                used += n_in + int(new.shape[0])
                text = tok.decode(new, skip_special_tokens=True)
                try:
                    if not text.strip():
                        raise BadAnswer("empty answer")
                    return parse(text), used
                except BadAnswer as e:
                    last = str(e)
            raise ChatError(f"{last} (after {self.settings.retries + 1} tries)")


BACKENDS: dict[str, type[OpenAIChat] | type[HFChat]] = {"openai": OpenAIChat, "hf": HFChat}
BackendKind = Literal["openai", "hf"]


def split_spec(spec: str) -> tuple[str, str]:
    """``'openai:http://x/v1'`` -> ``('openai', 'http://x/v1')``; ``'tokens'`` -> ``('tokens', '')``."""
    kind, _, target = str(spec).strip().partition(":")
    return kind.strip().lower(), target.strip()


def make_backend(spec: str, model: str | None, settings: ChatSettings) -> OpenAIChat | HFChat:
    """The chat backend a spec names (``openai:URL`` with ``model``, or ``hf:MODEL``); ValueError otherwise."""
    kind, target = split_spec(spec)
    if kind not in BACKENDS:
        raise ValueError(f"unknown LLM backend {spec!r}: use openai:URL (with --model) or hf:MODEL")
    return BACKENDS[kind](target, model, settings)
