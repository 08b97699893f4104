"""pvq: Pyramid Vector Quantization for large language models.

Importing pvq registers the ``"pvq"`` quantization method with transformers, so that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads a pvq checkpoint.
"""

__version__ = "0.2.0"

from pvq.errors import PVQError  # noqa: E402


def load(path, **kw):
    """Load a pvq checkpoint, verified: (model, tokenizer or None, info); see pvq.formats.load_checkpoint."""
    from pvq.formats import load_checkpoint

    return load_checkpoint(path, **kw)


def _register() -> None:
    try:
        from pvq.formats.hf import register_with_transformers
    except ImportError:  # transformers missing: the codec and quantizers still work
        return
    register_with_transformers()


_register()

__all__ = ["PVQError", "__version__", "load"]
