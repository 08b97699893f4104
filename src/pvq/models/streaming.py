"""A causal LM read from its safetensors shards one decoder block at a time.

`StreamedModel(directory)` builds the model on the meta device (no weight allocated),
then gives real tensors only to what is outside the decoder blocks (embedding, final
norm, head, rotary tables). `load_block(i)` reads block i's tensors from the
memory-mapped shards when its turn comes. `drop_block(i)` sends the block back to the meta
device. The layer-by-layer pipeline therefore holds one float block at a time, plus the
calibration activations and the packed results so far.

The values are exactly those of `from_pretrained(directory, dtype=dtype)`: each tensor is
read as stored and cast to `dtype`. Non-persistent buffers (rotary frequencies, Gemma's
embedding scale) are remade by the model's own initialiser. Tensors are found by the
model's own names, after transformers' load-time renamings (Mixtral's `block_sparse_moe`
is the model's `mlp`). A checkpoint that needs a tensor conversion to load is refused with
its names. That includes the per-expert MoE tensors that transformers fuses on load:
quantize those without streaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pvq.errors import PVQError
from pvq.memory import release_freed_memory, steady_heap

from .adapters import ArchitectureAdapter, adapter_for_type

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class StreamError(PVQError, ValueError):
    """A model that cannot be read block by block (named in the message)."""


def loaded_keys(model: nn.Module, keys) -> dict[str, str]:
    """{stored tensor name: the model's name for it}, after transformers' load-time key renamings."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    return {key: rename_source_key(key, renamings, [])[0] if renamings else key for key in keys}


def shard_files(directory: Path) -> dict[str, str]:
    """{stored tensor name: shard file name} of a safetensors checkpoint directory."""
    from safetensors import safe_open

    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise StreamError(f"{directory / INDEX_FILE} is not a safetensors index ({e})") from None
        for name in set(weight_map.values()):
            if not (directory / name).is_file():
                raise StreamError(f"{directory / INDEX_FILE} names shard {name}, which is missing")
        return dict(weight_map)
    if (directory / SINGLE_FILE).is_file():
        with safe_open(str(directory / SINGLE_FILE), framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise StreamError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: streaming reads safetensors checkpoints "
                      "(a .gguf or .bin model is quantized without --stream)")


class StreamedModel:
    """See the module docstring. `model` is the skeleton the pipeline works on; `adapter`
    its description; `bytes_read` counts the tensor bytes read so far."""

    def __init__(self, directory: str | Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory)
        self.dtype = dtype
        if not self.directory.is_dir():
            raise StreamError(f"streaming needs a local checkpoint directory, got {directory}")
        self.stored = shard_files(self.directory)
        config = AutoConfig.from_pretrained(str(self.directory), local_files_only=True)
        self.adapter: ArchitectureAdapter = adapter_for_type(getattr(config, "model_type", None))
        if self.adapter.moe is not None:
            raise StreamError(f"streaming a mixture-of-experts model ({config.model_type}) is not implemented: "
                              "transformers fuses its stored per-expert tensors on load; quantize it without --stream")
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        if (self.directory / "generation_config.json").is_file():  # as from_pretrained reads it
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(str(self.directory))
        self.bytes_read = 0
        self._handles: dict[str, object] = {}
        self._reading = False
        steady_heap()
        model_names = {name: key for key, name in loaded_keys(self.model, self.stored).items()}
        expected = set(self.model.state_dict())
        tied = set(getattr(self.model, "get_expanded_tied_weights_keys", lambda: {})() or {})
        missing = sorted(expected - set(model_names) - tied)
        unexpected = sorted(set(model_names) - expected)
        if missing or unexpected:
            raise StreamError(
                f"{self.directory}: the stored tensors are not the model's own ({config.model_type})"
                + (f"; not stored: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "")
                + (f"; not in the model: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
                   if unexpected else "")
                + ". Streaming reads tensors by the model's names; quantize this model without --stream")
        self._file_key = model_names  # model name -> stored name
        self._blocks_prefix = self.adapter.blocks + "."
        self._materialize(self.model, "", skip=self._blocks_prefix)
        if tied:
            self.model.tie_weights()
        self.loaded: set[int] = set()

    # -- reading -------------------------------------------------------------------------------
    def _tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        stored = self._file_key[name]
        file = self.stored[stored]
        handle = self._handles.get(file)
        if handle is None:  # open while one block is read (`_reading`): its mapped pages go with it
            handle = safe_open(str(self.directory / file), framework="pt")
            if self._reading:
                self._handles[file] = handle
        value = handle.get_tensor(stored)
        self.bytes_read += value.numel() * value.element_size()
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise StreamError(f"model tensor {name!r} has non-finite values; refusing to quantize the model")
        return value

    def _materialize(self, root: nn.Module, prefix: str, skip: str | None = None) -> None:
        """Real CPU tensors for every parameter and buffer under `root` (names `prefix` +
        relative; those starting with `skip` left alone): the model's initialiser for the
        non-persistent buffers, the stored values for the rest."""
        persistent = set(root.state_dict())
        for name, module in root.named_modules():
            full = prefix + name + "." if name else prefix
            if skip is not None and full.startswith(skip):
                continue
            own = [n for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
                   if t is not None and t.device.type == "meta"]
            if not own:
                continue
            for n in own:
                t = getattr(module, n)
                empty = torch.empty_like(t, device="cpu")
                if isinstance(t, nn.Parameter):
                    module._parameters[n] = nn.Parameter(empty, requires_grad=False)
                else:
                    module._buffers[n] = empty
            with torch.no_grad():
                if any((f"{name}.{n}" if name else n) not in persistent for n in own):
                    self.model._init_weights(module)  # remakes non-persistent buffers (rotary tables, scales)
                for n in own:
                    rel = f"{name}.{n}" if name else n
                    if rel not in persistent:
                        continue
                    key = prefix + rel
                    if key not in self._file_key:
                        continue  # tied: filled by tie_weights
                    value = self._tensor(key)
                    target = getattr(module, n)
                    if tuple(value.shape) != tuple(target.shape):
                        raise StreamError(f"stored tensor {self._file_key[key]} has shape {tuple(value.shape)}, the "
                                          f"model's {key} {tuple(target.shape)}")
                    target.copy_(value)  # cast in the copy: no converted temporary
        for name, t in list(root.named_parameters()) + list(root.named_buffers()):
            full = prefix + name
            if t.device.type == "meta" and not (skip is not None and full.startswith(skip)):
                raise StreamError(f"{full} has no stored value and no initialiser")

    # -- blocks --------------------------------------------------------------------------------
    def load_block(self, i: int) -> nn.Module:
        """Block i with its stored float values (idempotent)."""
        block = self.adapter.get_blocks(self.model)[i]
        if i not in self.loaded:
            self._reading = True
            try:
                self._materialize(block, f"{self.adapter.blocks}.{i}.")
            finally:
                self._reading = False
                self._handles.clear()  # unmaps the shards: their pages leave the resident set
            self.loaded.add(i)
        return block

    def drop_block(self, i: int) -> None:
        """Back to the meta device: block i's float tensors are freed."""
        block = self.adapter.get_blocks(self.model)[i]
        block.to("meta")
        self.loaded.discard(i)
        release_freed_memory()
