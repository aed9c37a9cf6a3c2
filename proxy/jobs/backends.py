"""Text generation for Private Evolution (its RANDOM and VARIATION calls) and the embedder: the
local model, or a ``model_list`` entry through litellm. ``dpicl worker --pe-backend module:factory``
and :meth:`proxy.jobs.manager.JobManager.create` accept other factories.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from aggregation.pe import first_line, random_messages, random_prompt, variation_messages, variation_prompt
from aggregation.prompts import TaskPrompt
from proxy.config import Config
from proxy.task_config import LOCAL_ALIASES
from proxy.jobs.requests import JobError
from proxy.upstreams.base import resolve_params


@dataclass
class PEBackend:
    """The three callables a PE run needs."""

    random_api: Callable[[str, int], list[str]]
    variation_api: Callable[[list[str], str], list[str]]
    embed: Callable[[Sequence[str]], Any]


class BackendContext(Protocol):
    """What a PE backend factory may use from the worker (:class:`proxy.jobs.execute.WorkerContext`)."""

    config: Config | None

    def local_generator(self, model_dir: str | None) -> "LocalTextGenerator":
        """The worker's (cached) local text generator for ``model_dir`` (None: the built-in model)."""

    def embedder(self) -> Any:
        """The worker's (cached) sentence embedder."""


#: ``factory(context, record, task_prompt) -> PEBackend``
PEBackendFactory = Callable[[BackendContext, dict, TaskPrompt], PEBackend]


class LocalTextGenerator:
    """Sampled completions from the local causal LM (batched, left padding), loaded lazily."""

    def __init__(self, model_dir: str | None = None, batch: int = 16):
        self.model_dir = model_dir
        self.batch = batch
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                from aggregation.sources.local import load_model

                self._loaded = load_model(self.model_dir)
        return self._loaded

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float) -> list[str]:
        import torch

        model, tok = self._load()
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out: list[str] = []
        for i in range(0, len(prompts), self.batch):
            chunk = list(prompts[i: i + self.batch])
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                # One text per line: stop a batch once every row has produced a newline.
                gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     stop_strings=["\n"], tokenizer=tok)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(first_line(tok.decode(row, skip_special_tokens=True)))
        return out


class LiteLLMTextGenerator:
    """Chat completions through litellm for a ``model_list`` entry (concurrent, bounded)."""

    def __init__(self, params: dict, concurrency: int = 8):
        self.params = params
        self.concurrency = concurrency

    def chat(self, messages: Sequence[list[dict]], max_new_tokens: int, temperature: float) -> list[str]:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        def one(msgs: list[dict]) -> str:
            resp = litellm.completion(messages=msgs, max_tokens=max_new_tokens, temperature=temperature,
                                      **self.params)
            return first_line(resp.choices[0].message.content or "")

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, messages))


def _fill(generate: Callable[[int], list[str]], n: int, rounds: int = 3) -> list[str]:
    """``n`` non-empty texts from ``generate(k)``, re-drawing empty ones a few times."""
    got = [t for t in generate(n) if t]
    for _ in range(rounds - 1):
        if len(got) >= n:
            break
        got += [t for t in generate(n - len(got)) if t]
    if len(got) < n:
        raise JobError(f"the model produced empty texts; got {len(got)} of {n}")
    return got[:n]


def default_pe_backend(ctx: BackendContext, record: dict, prompt: TaskPrompt) -> PEBackend:
    """RANDOM / VARIATION through the local model or a ``model_list`` entry (litellm), MiniLM embeddings."""
    params = record["params"]
    model = params.get("model") or "local"
    temperature = float(params.get("temperature", 1.0))
    max_new = int(params.get("max_new_tokens", 40))
    entry = ctx.config.model_entry(model) if ctx.config is not None else None
    if model in LOCAL_ALIASES or entry is None:
        model_dir = None if model in LOCAL_ALIASES else model
        if model_dir is None and ctx.config is not None:
            model_dir = ctx.config.server.local_model
        gen = ctx.local_generator(model_dir)

        def random_api(label: str, n: int) -> list[str]:
            return _fill(lambda k: gen.complete([random_prompt(prompt, label)] * k, max_new, temperature), n)

        def variation_api(texts: list[str], label: str) -> list[str]:
            out = gen.complete([variation_prompt(prompt, t, label) for t in texts], max_new, temperature)
            return [o or t for o, t in zip(out, texts)]  # an empty rewrite keeps its (synthetic) source
    else:
        llm = LiteLLMTextGenerator(resolve_params(entry.litellm_params, entry.model_name))

        def random_api(label: str, n: int) -> list[str]:
            return _fill(lambda k: llm.chat([random_messages(prompt, label)] * k, max_new, temperature), n)

        def variation_api(texts: list[str], label: str) -> list[str]:
            out = llm.chat([variation_messages(prompt, t, label) for t in texts], max_new, temperature)
            return [o or t for o, t in zip(out, texts)]
    return PEBackend(random_api, variation_api, ctx.embedder())


def load_backend_factory(spec: str | None) -> PEBackendFactory:
    """``"module:attribute"`` -> a PE backend factory (default: :func:`default_pe_backend`)."""
    if not spec:
        return default_pe_backend
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError("a PE backend is given as 'module:attribute'")
    return getattr(importlib.import_module(module), attr)
