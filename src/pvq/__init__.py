"""pvq: Pyramid Vector Quantization for large language models.

Importing pvq registers the ``"pvq"`` quantization method with transformers, so that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads a pvq checkpoint.
The Python API: ``pvq.quantize`` (a model in, the quantized model out, in memory),
``pvq.save`` (write it as a checkpoint), ``pvq.load`` (read one back); see `pvq.api`.
"""

from pvq.version import __version__  # noqa: E402

from pvq.errors import PVQError  # noqa: E402


def load(path, **kw):
    """Load a pvq checkpoint, verified: (model, tokenizer or None, info); see pvq.checkpoint.load_checkpoint."""
    from pvq.checkpoint import load_checkpoint

    return load_checkpoint(path, **kw)


def __getattr__(name: str):
    """`pvq.quantize` and `pvq.save` (the Python API, `pvq.api`), imported on first use so
    that `import pvq` stays cheap."""
    if name in ("quantize", "save"):
        from pvq import api

        return getattr(api, name)
    raise AttributeError(f"module 'pvq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "quantize", "save"})


def _register() -> None:
    try:
        from pvq.checkpoint.hf import register_with_transformers
    except ImportError:  # transformers missing: the codec and quantizers still work
        return
    register_with_transformers()


_register()

__all__ = ["PVQError", "__version__", "load", "quantize", "save"]
