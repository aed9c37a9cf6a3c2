"""Next-token distributions from any OpenAI-compatible completions endpoint, through litellm.

Each prompt costs one call to the legacy ``/v1/completions`` endpoint with ``max_tokens=1``,
``temperature=0`` and ``logprobs=top_logprobs``; the answer's ``top_logprobs[0]`` (a mapping from
token text to log-probability) is the prompt's next-token distribution, truncated to the server's
top-k. Tokens are the token *strings* the server returns.

Privacy rules this module keeps:

* No failure depends on private data. Prompts are bounded by a public length budget:
  :meth:`OpenAICompatSource.count_tokens` is a public upper bound on the provider's token count
  (UTF-8 bytes by default), so the generator leaves out examples that do not fit, as it does for
  the local model. A private prompt whose call still fails for good after the retries contributes
  an all-zero row, however many private calls fail: a step always returns exactly ``M`` rows, each
  a function of its own subset, and a zero row is within the mechanism's ``sqrt(2)/M``
  sensitivity. A step aborts only when a *public* call fails for good (the public prompt's, made
  every step whatever the data, with the same retries). Whether a private call fails never decides
  whether another call is made or the step aborts: with a flaky upstream, an abort rule that looked
  at private failures (e.g. "every private call failed and a probe failed too") would abort more
  often when a record that makes the upstream refuse is sampled, a leak outside the accounting.
* Prompts contain private records, so nothing here logs them, and a :class:`SourceError` carries
  only the exception type and HTTP status - never litellm's message, which can quote the request or
  a server reply echoing it. It is raised outside the ``except`` block, so the original exception
  is not even attached as ``__context__``.
* The API key is never logged or shown in ``repr``.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from aggregation.sources.base import DecodeState, NextTokenSource, Token
from aggregation.sources.failures import SourceError, is_transient, status_of

__all__ = ["OpenAICompatSource", "OpenAICompatState", "SourceError"]

#: Token texts that end a text. llama.cpp renders end-of-sequence (and other special tokens) as
#: the empty string; other servers print the special token itself.
DEFAULT_END_TOKENS: frozenset[str] = frozenset({"", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>"})

#: Tokens a provider may add around a prompt (a BOS, a leading-space token) in the length bound.
_SPECIAL_TOKENS = 2



class OpenAICompatSource(NextTokenSource):
    """Next-token source backed by an OpenAI-compatible ``/v1/completions`` server via litellm.

    Args:
        model: litellm model string, e.g. ``"openai/<served-name>"`` (``openai/`` = any
            OpenAI-compatible server at ``api_base``).
        api_base: Base URL, e.g. ``"http://127.0.0.1:8080/v1"``.
        api_key: The key; by default read from the environment variable ``api_key_env``. Servers
            without authentication get a placeholder. Never logged or shown in ``repr``.
        api_key_env: Environment variable holding the key (default ``OPENAI_API_KEY``).
        top_logprobs: How many alternatives to ask for per call. 20 is the usual cap of hosted
            APIs (OpenAI's legacy endpoint allows only 5); llama.cpp servers accept more and vLLM
            can return up to the whole vocabulary (raise its ``--max-logprobs``). Candidates
            outside a prompt's top list get probability 0 (see docs/sources.md).
        max_concurrency: Calls in flight at once across every state of this source (a bounded
            thread pool).
        retries: Extra attempts per call on transient errors (timeouts, connection errors, 429,
            5xx), with exponential backoff and jitter. Other errors fail at once.
        timeout: Seconds per attempt.
        backoff: First backoff delay in seconds (doubled per attempt, capped at ``max_backoff``).
        end_tokens: Token texts :meth:`is_end` treats as end-of-text.
        end_token_ids: Token ids of the model's end-of-sequence tokens, if known. They are sent
            as ``logit_bias`` -100 so the server still emits a token, and therefore logprobs, when
            end-of-sequence is the most likely next token. llama.cpp computes logprobs before the
            bias, so the end token keeps its true probability (as the key ``""``). Without this,
            such a call comes back empty and its row becomes a point mass on the end token.
        bytes_per_token: The public length budget's exchange rate. :meth:`count_tokens` returns
            ``ceil(UTF-8 bytes / bytes_per_token) + 2``. With the default 1.0 that is an upper bound
            on the token count of any byte-level BPE or byte-fallback SentencePiece tokenizer
            (every token covers at least one byte; 2 covers a BOS and a leading-space token), so
            a prompt that fits the budget fits the provider's context. A larger value admits more
            text per budget; a prompt that then overflows costs its row (all-zero), never the step.
    """

    caches_state = False

    def __init__(
        self,
        model: str,
        api_base: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        top_logprobs: int = 20,
        max_concurrency: int = 8,
        retries: int = 3,
        timeout: float = 30.0,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        end_tokens: Iterable[str] = DEFAULT_END_TOKENS,
        end_token_ids: Sequence[int] = (),
        bytes_per_token: float = 1.0,
    ):
        if top_logprobs < 1:
            raise ValueError("top_logprobs must be at least 1")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("retries must be >= 0, timeout > 0 and backoff >= 0")
        if not bytes_per_token > 0:
            raise ValueError("bytes_per_token must be positive")
        self.model = model
        self.api_base = api_base
        self.top_logprobs = int(top_logprobs)
        self.max_concurrency = int(max_concurrency)
        self.retries = int(retries)
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.end_tokens = frozenset(end_tokens)
        self._logit_bias = {str(int(i)): -100.0 for i in end_token_ids} or None
        self.bytes_per_token = float(bytes_per_token)
        # Local servers ignore the key, but the OpenAI client insists on one.
        self.__api_key = api_key if api_key is not None else os.environ.get(api_key_env) or "no-key"
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._count_lock = threading.Lock()
        #: Completion calls made, including retries (for statistics).
        self.requests = 0
        #: Private prompts whose call failed for good and became an all-zero row. Admin statistics
        #: only: the count can depend on private records (it is never part of a generation's output).
        self.failed_rows = 0

    def __repr__(self) -> str:
        return f"OpenAICompatSource(model={self.model!r}, api_base={self.api_base!r}, top_logprobs={self.top_logprobs})"

    # -- NextTokenSource --------------------------------------------------------------------
    def open(self, prompts: Sequence[str], suffix: Sequence[Token] = (), keep_state: bool = False,
             width: int | None = None, prefix: str = "") -> "OpenAICompatState":
        """Start decoding; nothing is sent until :meth:`~OpenAICompatState.probs` or ``top_tokens``.

        ``width`` is ignored: every prompt is its own request, so there is no shared batch shape.
        """
        if not prompts:
            raise ValueError("at least one prompt is needed")
        tail = "".join(str(t) for t in suffix)
        return OpenAICompatState(self, [prefix + p + tail for p in prompts])

    def count_tokens(self, text: str, prefix: str = "") -> int:
        """A public upper bound on the provider's token count of ``prefix + text``.

        ``ceil(UTF-8 bytes / bytes_per_token) + 2``: a fixed formula of the text, so budgets set in
        these units bound every API prompt without knowing the provider's tokenizer (see
        ``bytes_per_token``). The generator uses it to leave out examples that do not fit.
        """
        n = len((prefix + text).encode("utf-8"))
        return math.ceil(n / self.bytes_per_token) + _SPECIAL_TOKENS

    def decode(self, tokens: Sequence[Token]) -> str:
        """Token texts concatenated (the tokens *are* text here)."""
        return "".join(str(t) for t in tokens)

    def vocabulary(self) -> None:
        """``None``: an API gives top-k lists only, so the full vocabulary cannot be scored."""
        return None

    def is_end(self, token: Token) -> bool:
        return str(token) in self.end_tokens

    # -- calls ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads (a new pool starts if the source is used again)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "OpenAICompatSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="dpicl-openai")
            return self._pool

    def next_token_logprobs(self, prompts: Sequence[str]) -> list[dict[str, float] | None]:
        """One completion call per prompt, concurrently; ``{token text: logprob}`` per prompt.

        Returns exactly ``len(prompts)`` entries in prompt order; ``None`` for a prompt whose call
        failed for good (after the retries). It never raises for a single prompt's failure.
        """
        return [None if isinstance(r, SourceError) else r for r in self._gather(prompts)]

    def _gather(self, prompts: Sequence[str]) -> list[dict[str, float] | SourceError]:
        """Every prompt's top logprobs or its (text-free) :class:`SourceError`, in prompt order."""
        futures: list[Future[dict[str, float]]] = [self._executor().submit(self._call, p) for p in prompts]
        wait(futures)
        out: list[dict[str, float] | SourceError] = []
        for f in futures:
            exc = f.exception()
            if exc is None:
                out.append(f.result())
            elif isinstance(exc, SourceError):
                out.append(SourceError(str(exc), exc.status, exc.kind))
            else:  # a bug in parsing; report its type only (it may hold reply text)
                out.append(SourceError(f"next-token call failed: {type(exc).__name__}", kind=type(exc).__name__))
        if len(out) != len(prompts):  # cannot happen; the accounting depends on it, so check
            raise SourceError(f"expected {len(prompts)} results, got {len(out)}")
        return out

    def public_logprobs(self, prompt: str) -> dict[str, float]:
        """One call for a prompt that holds no private data; its failure raises :class:`SourceError`."""
        result = self._gather([prompt])[0]
        if isinstance(result, SourceError):
            raise result
        return result

    def private_logprobs(self, prompts: Sequence[str]) -> list[dict[str, float] | None]:
        """Rows of private prompts: ``None`` (an all-zero row) where a call failed for good.

        Never raises for a failed call, even when every call failed: the abort decision belongs to
        the public calls (:meth:`public_logprobs`), so it cannot depend on which records were
        sampled. An upstream that is down fails the step's public call instead.
        """
        results = self._gather(prompts)
        failed = sum(isinstance(r, SourceError) for r in results)
        with self._count_lock:
            self.failed_rows += failed
        return [None if isinstance(r, SourceError) else r for r in results]

    def _call(self, prompt: str) -> dict[str, float]:
        """One prompt's top logprobs, retrying transient errors; raises :class:`SourceError`."""
        import litellm  # imported lazily: it is slow to import and only this backend needs it

        # litellm prints a help banner on every failed attempt; it carries no prompt text but
        # floods the logs during retries.
        litellm.suppress_debug_info = True
        attempts = self.retries + 1
        failure: tuple[str, int | None] | None = None
        for attempt in range(attempts):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random() / 2))  # jitter spreads retries of M calls
            with self._count_lock:
                self.requests += 1
            try:
                response = litellm.text_completion(
                    model=self.model,
                    prompt=prompt,
                    api_base=self.api_base,
                    api_key=self.__api_key,
                    max_tokens=1,
                    temperature=0,
                    logprobs=self.top_logprobs,
                    logit_bias=self._logit_bias,
                    timeout=self.timeout,
                    max_retries=0,  # the retries are ours; the OpenAI client's would double them
                )
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised without text
                failure = (type(exc).__name__, status_of(exc))
                if not is_transient(exc):
                    break
                continue
            return self._parse(response)
        assert failure is not None
        kind, status = failure
        tried = attempt + 1
        # Raised outside the except block on purpose: no __context__ holding the prompt.
        raise SourceError(
            f"next-token call to {self.model!r} failed after {tried} attempt(s): {kind}"
            + (f" (HTTP {status})" if status is not None else ""),
            status,
            kind,
        )

    def _parse(self, response: Any) -> dict[str, float]:
        """``{token: logprob}`` from a completions response; raises :class:`SourceError`."""
        choices = _get(response, "choices") or []
        if not choices:
            raise SourceError("the server returned no choices")
        choice = choices[0]
        logprobs = _get(choice, "logprobs")
        if logprobs is None:
            raise SourceError("the server returned no logprobs; it must support 'logprobs' on /v1/completions")
        top = _get(logprobs, "top_logprobs") or []
        if top and top[0]:
            return _as_logprob_dict(top[0])
        if _get(choice, "finish_reason") == "stop":
            # The server stopped before emitting a token: the most likely next token is an end
            # token (llama.cpp omits it from logprobs). We know its rank, not its probability, so
            # the row is a point mass on the end token: still a function of this prompt alone,
            # hence within the mechanism's sensitivity. Use end_token_ids to get the real row.
            return {"": 0.0}
        raise SourceError("the server returned empty logprobs")


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_logprob_dict(top: Any) -> dict[str, float]:
    """Normalise one position's top logprobs: a dict (legacy format) or a list of entries."""
    if isinstance(top, Mapping):
        items = top.items()
    else:  # chat-style [{"token": ..., "logprob": ...}, ...]
        items = ((_get(e, "token"), _get(e, "logprob")) for e in top)
    out: dict[str, float] = {}
    for token, lp in items:
        if token is None or lp is None:
            continue
        lp = float(lp)
        if math.isnan(lp):
            continue
        # Two token ids can share a text; keep the larger logprob (the list is a top-k anyway).
        out[str(token)] = max(lp, out.get(str(token), -math.inf))
    return out


class OpenAICompatState(DecodeState):
    """``M`` prompts as text; the next-token distributions are fetched lazily, once per step.

    :meth:`probs` treats every prompt as private (a failed call gives an all-zero row), except
    prompt 0 once :meth:`top_tokens` has read it as the public prompt (a failed call fails the
    step; its reply is reused for row 0).
    """

    def __init__(self, source: OpenAICompatSource, texts: list[str]):
        self.source = source
        self.calls = 0
        #: Rows that came back all-zero because their call failed (admin statistics only).
        self.failed_rows = 0
        self._texts = texts
        self._rows: list[dict[str, float] | None] | None = None  # all prompts, this step
        self._first: dict[str, float] | None = None  # prompt 0 only (public prompt)

    def _all_rows(self) -> list[dict[str, float] | None]:
        if self._rows is None:
            if self._first is not None:
                # top_tokens made prompt 0 the public prompt and already fetched it this step (with
                # public failure rules): reuse that reply rather than re-sending it as a private row.
                texts, head = self._texts[1:], [self._first]
            else:
                texts, head = self._texts, []
            rows = self.source.private_logprobs(texts) if texts else []
            self._rows = [*head, *rows]
            self.failed_rows += sum(r is None for r in rows)
            self.calls += 1 if texts else 0  # one batch of concurrent calls counts as one model call
        return self._rows

    def probs(self, candidates: Sequence[Token] | None) -> np.ndarray:
        """``[M, K]`` probabilities ``exp(logprob)`` of the candidate texts; 0 when not in a top list.

        A prompt whose call failed for good gets an all-zero row (see the module docstring).
        """
        if candidates is None:
            raise ValueError("an OpenAI-compatible source cannot score the full vocabulary; set top_k")
        rows = self._all_rows()
        out = np.zeros((len(rows), len(candidates)), dtype=np.float64)
        for i, row in enumerate(rows):
            if row is None:
                continue
            for j, tok in enumerate(candidates):
                lp = row.get(str(tok))
                if lp is not None:
                    out[i, j] = math.exp(min(lp, 0.0))
        if out.shape[0] != len(self._texts):  # never fewer rows than prompts
            raise SourceError("distribution count does not match the number of prompts")
        return out

    def top_tokens(self, k: int) -> list[Token]:
        """Prompt 0's most likely tokens, best first; at most what the server returned.

        Prompt 0 is the public prompt here: if its call fails for good, :class:`SourceError`.
        """
        if self._first is None:
            self._first = self.source.public_logprobs(self._texts[0])
            self.calls += 1
        ranked = sorted(self._first.items(), key=lambda kv: -kv[1])
        return [tok for tok, _ in ranked[: max(0, k)]]

    def advance(self, token: Token) -> None:
        """Append the token text to every prompt; the next query re-sends the whole text."""
        tail = str(token)
        self._texts = [t + tail for t in self._texts]
        self._rows = None
        self._first = None
