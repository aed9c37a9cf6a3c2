"""Forwarding to the models behind the proxy: base (Upstream, errors, SSE and retry helpers), direct
(aiohttp/httpx fast path), sse (checking relayed event streams), litellm (any provider), local (built-in model), factory (build_upstream).
Knows nothing of DP: imports no aggregation and no other part of proxy, only libraries.
"""

from proxy.upstreams.base import DONE, StreamError, Upstream, UpstreamError, resolve_env, resolve_params, \
    safe_upstream_message, sse_error
from proxy.upstreams.direct import AiohttpOpenAIUpstream, OpenAIHTTPUpstream
from proxy.upstreams.factory import build_upstream, fast_path_applies, is_local
from proxy.upstreams.litellm import LiteLLMUpstream
from proxy.upstreams.local import LocalChatUpstream

__all__ = [
    "DONE", "AiohttpOpenAIUpstream", "LiteLLMUpstream", "LocalChatUpstream", "OpenAIHTTPUpstream", "StreamError", "Upstream",
    "UpstreamError", "build_upstream", "fast_path_applies", "is_local", "resolve_env", "resolve_params",
    "safe_upstream_message", "sse_error",
]
