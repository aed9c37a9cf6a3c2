"""The generator models of DP demonstrations: one next-token source per generator, loaded lazily
once per process (the built-in local model, shared with its upstream, or an OpenAI-compatible API).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from aggregation.sources.base import NextTokenSource
from proxy.config import Config
from proxy.task_config import LOCAL_ALIASES, LOCAL_MODEL_NAME, TaskConfig
from proxy.errors import APIError


class TokenCounting(Protocol):
    """Anything that counts a generator's tokens (a :class:`NextTokenSource`, or a tokenizer alone)."""

    def count_tokens(self, text: str, prefix: str = "") -> int | None: ...


class Generators:
    """Next-token sources by generator identity (which is part of a demonstration set's cache key)."""

    def __init__(self, config: Config, local_source: Callable[[], NextTokenSource] | None = None):
        self.config = config
        self._local_source_factory = local_source
        self._sources: dict[str, NextTokenSource] = {}
        self._counters: dict[str, TokenCounting] = {}
        self._sources_lock = threading.Lock()

    def generator_id(self, task: TaskConfig) -> str:
        """Identity of the generator model (part of the cache key)."""
        gen = task.generator
        if gen is None or gen in LOCAL_ALIASES:
            precision = self.config.server.local_precision
            # float32 keeps the identity it always had (cached sets stay valid).
            tail = "" if precision == "float32" else f"@{precision}"
            return "local:" + (self.config.server.local_model or LOCAL_MODEL_NAME) + tail
        entry = self.config.model_entry(gen)
        params = entry.litellm_params if entry is not None else {}
        return f"openai:{params.get('model')}@{params.get('api_base')}:{task.generation.top_logprobs}"

    def source(self, task: TaskConfig) -> NextTokenSource:
        """The generator's next-token source, loaded lazily once per process."""
        gid = self.generator_id(task)
        with self._sources_lock:
            src = self._sources.get(gid)
            if src is not None:
                return src
            if gid.startswith("local:"):
                if self._local_source_factory is not None:
                    src = self._local_source_factory()
                else:
                    from aggregation.sources.local import LocalSource

                    src = LocalSource.from_pretrained(self.config.server.local_model,
                                                      self.config.server.local_precision)
            else:
                src = self._openai_source(task)
            self._sources[gid] = src
            return src

    def token_counter(self, task: TaskConfig) -> TokenCounting:
        """What counts the generator's tokens where nothing is generated (an admin view, a dry run):
        the loaded source when this process has it, else for the local model its tokenizer alone
        (loaded once per process), so showing a derived prompt width never loads model weights."""
        gid = self.generator_id(task)
        if not gid.startswith("local:"):
            return self.source(task)  # an API generator: nothing heavy to load
        with self._sources_lock:
            loaded = self._sources.get(gid)
            if loaded is not None:
                return loaded
            counting = self._counters.get(gid)
            if counting is None:
                from aggregation.sources.local import TokenizerCounter, load_tokenizer

                counting = self._counters[gid] = TokenizerCounter(load_tokenizer(self.config.server.local_model))
            return counting

    def _openai_source(self, task: TaskConfig) -> NextTokenSource:
        import os

        from aggregation.sources.openai_compat import OpenAICompatSource

        entry = self.config.model_entry(task.generator or "")
        if entry is None:
            raise APIError(400, f"task {task.name!r}: generator {task.generator!r} is not in model_list",
                           "unknown_generator")
        params = entry.litellm_params
        key_ref = params.get("api_key")
        api_key = None
        if isinstance(key_ref, str) and key_ref.startswith("os.environ/"):
            api_key = os.environ.get(key_ref.split("/", 1)[1])
        return OpenAICompatSource(
            params["model"], params.get("api_base"), api_key,
            top_logprobs=task.generation.top_logprobs,
            retries=self.config.server.retries, timeout=self.config.server.timeout,
        )

    def close(self) -> None:
        """Close the sources that hold resources (thread pools, HTTP sessions)."""
        for src in self._sources.values():
            close = getattr(src, "close", None)
            if callable(close):
                close()

