"""``build_upstream``: one LiteLLM-style ``model_list`` item -> the :class:`Upstream` that serves it
(built-in local model, direct HTTP fast path, or litellm).
"""

from __future__ import annotations

import httpx

from proxy.upstreams.base import Upstream, resolve_params
from proxy.upstreams.direct import AiohttpOpenAIUpstream, OpenAIHTTPUpstream
from proxy.upstreams.litellm import LiteLLMUpstream
from proxy.upstreams.local import LocalChatUpstream, ModelLoader

#: ``litellm_params`` the direct HTTP path understands; any other key means "use litellm".
FAST_PATH_PARAMS = frozenset({"model", "api_base", "api_key", "timeout", "stream_timeout", "max_retries",
                              "num_retries", "extra_headers", "organization"})


def is_local(model: str) -> bool:
    """Whether a ``litellm_params.model`` selects the built-in local model."""
    return model == "local" or model.startswith("local/")


def fast_path_applies(params: dict) -> bool:
    """Whether the direct HTTP path can serve these ``litellm_params`` exactly as litellm would."""
    model = str(params.get("model", ""))
    if not params.get("api_base"):
        return False
    if not (model.startswith("openai/") or model.startswith("hosted_vllm/")):
        return False
    return set(params) <= FAST_PATH_PARAMS


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401 - a litellm dependency, so normally present
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return True


def build_upstream(entry: dict, http: httpx.AsyncClient | None, timeout: float, retries: int,
                   backoff: float = 0.25, local_loader: ModelLoader | None = None,
                   max_retry_wait: float = 8.0) -> Upstream:
    """Build the upstream for one LiteLLM-style ``model_list`` item.

    ``entry = {"model_name": "gpt-x", "litellm_params": {"model": "openai/gpt-4o", "api_base": ...,
    "api_key": "os.environ/OPENAI_API_KEY", ...}}``. ``litellm_params.model`` of ``local`` or
    ``local/smollm2`` selects the built-in SmolLM2, ``local/<dir>`` any local HF model directory.
    ``litellm_params.timeout`` and ``num_retries``/``max_retries`` override the global ``timeout`` and
    ``retries``. OpenAI-compatible entries (``openai/...`` with ``api_base``, or ``hosted_vllm/...``)
    use the direct HTTP fast path (measured faster, see docs/upstreams.md) unless the entry sets
    ``fast_path: false`` or has ``litellm_params`` the fast path does not handle; ``fast_path:
    httpx`` uses the shared ``http`` client instead of an aiohttp session (``aiohttp``, the default).
    ``local_loader(model_dir)`` loads the local model's ``(model, tokenizer)`` on first use (the app
    passes :func:`aggregation.sources.local.load_model`; forwarding itself imports no DP code).
    ``max_retry_wait`` caps the total wait between retries of one request (see :class:`proxy.upstreams.base.RetryingUpstream`).
    Raises ``ValueError`` for an invalid entry or a missing environment variable.
    """
    name = entry.get("model_name")
    raw = entry.get("litellm_params") or {}
    if not isinstance(name, str) or not name:
        raise ValueError("model_list entry needs a model_name")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw["model"]:
        raise ValueError(f"model {name!r}: litellm_params.model is required")
    params = resolve_params(raw, name)
    model = params["model"]
    timeout = float(params.get("timeout", timeout))
    retries = int(params.get("num_retries", params.get("max_retries", retries)))

    if is_local(model):
        target = model.partition("/")[2]
        return LocalChatUpstream(name, None if target in ("", "smollm2") else target,
                                 max_tokens_cap=int(params.get("max_tokens_cap", 512)), loader=local_loader)
    fast = entry.get("fast_path", True)
    if fast not in (True, False, "aiohttp", "httpx"):
        raise ValueError(f"model {name!r}: fast_path must be true, false, 'aiohttp' or 'httpx'")
    if fast is not False and fast_path_applies(params):
        cls = OpenAIHTTPUpstream if fast == "httpx" or not _has_aiohttp() else AiohttpOpenAIUpstream
        return cls(
            name, model.split("/", 1)[1], params["api_base"], api_key=params.get("api_key"),
            http=http if cls is OpenAIHTTPUpstream else None, timeout=timeout, retries=retries, backoff=backoff,
            extra_headers=params.get("extra_headers"), organization=params.get("organization"),
            max_retry_wait=max_retry_wait)
    return LiteLLMUpstream(name, params, timeout=timeout, retries=retries, backoff=backoff,
                           max_retry_wait=max_retry_wait)
