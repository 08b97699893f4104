"""pvq: Pyramid Vector Quantization for large language models."""

__version__ = "0.1.0"


def load(path, **kw):
    """Load a packed pvq checkpoint: (model, tokenizer or None, manifest); see pvq.formats.load_checkpoint."""
    from pvq.formats import load_checkpoint

    return load_checkpoint(path, **kw)
