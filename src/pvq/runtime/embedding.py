"""The token embedding and the output head stored on a scalar grid ("every byte counted").

The embedding table (V x H) is quantized round-to-nearest (`pvq.methods.rtn`: per group of
`group_size` columns a float16 scale and a `bits`-bit zero point, codes bit-packed) and
held by `QuantizedEmbedding`, whose `state_dict` is that payload; a lookup decodes only
the rows it reads. A head tied to the embedding is served from the same payload by
`TiedHead` (stored once, no buffer of its own); an untied head becomes a `QuantizedHead`
with a table of its own. Either way the head runs through the
linear kernels (`pvq.runtime.kernels`), so its float weight is never held whole.

The record (`quantization_config.embeddings`): ``{"config": RTN fields, "embedding":
module name, "head": module name or None, "tied": bool}``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from pvq.codec import unpack_codes
from pvq.methods import QuantizationError, QuantizedTensor, get_method
from pvq.methods.rtn import grid_dequantize

from pvq.runtime.errors import CheckpointError
from pvq.runtime.linear import PackedPayload, QuantizedLinear, replace_linear

#: What the main job stores the embedding (and head) with: 8 bits, a scale and zero point
#: per 64 columns (measured: no perplexity cost on the benchmark model; docs/results.md).
DEFAULT_EMBEDDINGS = {"bits": 8, "group_size": 64}

__all__ = ["DEFAULT_EMBEDDINGS", "check_embeddings", "QuantizedEmbedding", "QuantizedHead", "TiedHead", "embedding_record", "install_embeddings",
           "quantize_embeddings"]


class QuantizedEmbedding(PackedPayload, nn.Module):
    """``nn.Embedding`` whose (num_embeddings x embedding_dim) table lives only as an RTN
    payload (persistent integer buffers); `forward(ids)` decodes the rows it reads, in
    float32 exactly as `pvq.methods.rtn.dequantize`, then casts them to `dtype` (and multiplies
    them by `embed_scale` as the scaled embeddings of Gemma models do)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, name: str | None = None,
                 embed_scale: float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        method = get_method("rtn")
        self.config = method.make_config(config)
        if (self.embedding_dim * int(self.config.bits)) % 8:
            raise QuantizationError(f"an embedding row of {self.embedding_dim} x {self.config.bits} bits is not a whole "
                                    "number of bytes; use 8 bits or a width divisible by 8")
        shape = (self.num_embeddings, self.embedding_dim)
        self.layout = method.layout(self.config, shape)
        self.payload_spec = method.payload_spec(self.config, shape)
        self._register_payload(device)
        self.dtype = dtype
        self.embed_scale = embed_scale
        self.layer_name = name
        self._zeros: tuple[tuple, torch.Tensor] | None = None  # (payload key, unpacked zero points (V, G))

    def _label(self) -> str:
        return f"embedding {self.layer_name!r} (rtn)" if self.layer_name else "quantized embedding (rtn)"

    @property
    def method(self) -> str:
        return "rtn"

    def dequantize(self) -> torch.Tensor:
        """The whole float32 table (for tests and the reference path; a forward never forms it)."""
        qt = QuantizedTensor("rtn", (self.num_embeddings, self.embedding_dim), self.payload(), self.layout)
        return get_method("rtn").dequantize(qt)

    def _zero_points(self) -> torch.Tensor:
        key = self.payload_key()
        if self._zeros is None or self._zeros[0] != key:
            V, G, bits = self.num_embeddings, int(self.layout["num_groups"]), int(self.layout["bits"])
            zeros = unpack_codes(self.zeros.cpu().numpy(), V * G, bits)[:, 0].astype(np.int32).reshape(V, G)
            self._zeros = (key, torch.from_numpy(zeros).to(self.codes.device))
        return self._zeros[1]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (1-D int64) of the table, float32 (len(ids), embedding_dim)."""
        H, gs, G, bits = self.embedding_dim, int(self.layout["group_size"]), int(self.layout["num_groups"]), \
            int(self.layout["bits"])
        row_bytes = H * bits // 8
        packed = self.codes.view(self.num_embeddings, row_bytes)[ids]
        if bits == 8:
            codes = packed.to(torch.int32)
        else:
            flat = unpack_codes(packed.cpu().numpy().reshape(-1), ids.numel() * H, bits)[:, 0]
            codes = torch.from_numpy(flat.astype(np.int32)).to(packed.device)
        codes = codes.view(-1, G, gs)
        scales = self.scales[ids].view(torch.float16)
        zeros = self._zero_points()[ids]
        return grid_dequantize(codes, scales[:, :, None], zeros[:, :, None]).reshape(-1, H)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise QuantizationError(f"{self._label()}: expects integer token ids, got {input_ids.dtype}")
        ids = input_ids.reshape(-1).to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise QuantizationError(f"{self._label()}: token id out of range [0, {self.num_embeddings})")
        out = self.rows(ids).to(self.dtype)
        if self.embed_scale is not None:  # as *ScaledWordEmbedding: a float32 scalar cast to the table's dtype
            out = out * torch.tensor(self.embed_scale, dtype=torch.float32).to(self.dtype)
        return out.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        bpw = self.stored_bytes * 8 / (self.num_embeddings * self.embedding_dim)
        return f"{self.num_embeddings}, {self.embedding_dim}, method=rtn, bits_per_weight={bpw:.4g}"


class TiedHead(nn.Module):
    """The output head of a model whose head is tied to its embedding: ``x @ E^T`` from the
    embedding's payload, through the linear kernels. It holds no tensor (the state_dict
    stores the table once, under the embedding)."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_table", embedding)  # not a submodule: stored once
        self._make_view(embedding)

    def _make_view(self, table: QuantizedEmbedding) -> None:
        with torch.device("meta"):  # a linear over the table's buffers, not registered: nothing stored twice
            view = QuantizedLinear(table.embedding_dim, table.num_embeddings, "rtn", table.config,
                                   name=f"{table.layer_name} (as the output head)")
        object.__setattr__(self, "_linear", view)
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings

    def _payload_table(self) -> QuantizedEmbedding:
        return self._table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._payload_table()
        for tname in table.payload_spec:  # follow the table's buffers (moved, reloaded)
            self._linear._buffers[tname] = table._buffers[tname]
        return self._linear(x)

    @property
    def last_kernel(self) -> str | None:
        return self._linear.last_kernel


class QuantizedHead(TiedHead):
    """An untied output head stored on the grid: its own table (the submodule ``table``,
    a `QuantizedEmbedding` of (vocab, hidden)), served like a tied one."""

    def __init__(self, table: QuantizedEmbedding) -> None:
        nn.Module.__init__(self)
        self.table = table
        self._make_view(table)

    def _payload_table(self) -> QuantizedEmbedding:
        return self.table

    def dequantize(self) -> torch.Tensor:
        return self.table.dequantize()


def _module(model: nn.Module, name: str, kind: type, what: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{what} {name!r} is not a module of the model") from None
    if not isinstance(module, kind):
        raise CheckpointError(f"{what} {name!r} is a {type(module).__name__}, not {kind.__name__}")
    return module


def embedding_scale(module: nn.Module) -> float | None:
    """The factor a token embedding multiplies its rows by (None: a plain nn.Embedding);
    QuantizationError for an embedding class whose forward pvq does not reproduce."""
    if type(module) is nn.Embedding:
        return None
    if isinstance(module, nn.Embedding) and type(module).__name__.endswith("ScaledWordEmbedding") \
            and isinstance(getattr(module, "scalar_embed_scale", None), (int, float)):
        return float(module.scalar_embed_scale)
    raise QuantizationError(f"the input embedding is a {type(module).__name__}, whose forward pvq does not reproduce; "
                            "keep it dense (no --embed-bits)")


def _head_is_tied(model: nn.Module, embedding: nn.Module, head: nn.Module | None) -> bool:
    return head is not None and getattr(head, "weight", None) is not None and head.weight is embedding.weight


#: Rows quantized at a time (a multiple of 8, so every chunk's packed streams are whole
#: bytes and their concatenation is the packing of the whole table): the temporaries stay
#: a few MiB for any vocabulary.
TABLE_CHUNK_ROWS = 2048


def quantize_table(weight: torch.Tensor, config: Any, chunk_rows: int = TABLE_CHUNK_ROWS) -> dict[str, np.ndarray]:
    """The RTN payload of a (rows, cols) table, quantized `chunk_rows` rows at a time; the
    same bytes as `pvq.methods.rtn.quantize` of the whole table (round-to-nearest is row-wise)."""
    if chunk_rows % 8:
        raise QuantizationError(f"chunk_rows must be a multiple of 8, got {chunk_rows}")
    method = get_method("rtn")
    parts = [method.quantize(weight[lo:lo + chunk_rows].detach().float().cpu(), None, config).tensors
             for lo in range(0, weight.shape[0], chunk_rows)]
    return {"codes": np.concatenate([p["codes"] for p in parts]),
            "scales": np.concatenate([p["scales"] for p in parts]),
            "zeros": np.concatenate([p["zeros"] for p in parts])}


def check_embeddings(model: nn.Module, config: Any) -> None:
    """QuantizationError now, before any long work, if `quantize_embeddings(model, config)`
    would refuse: an embedding class whose forward pvq does not reproduce, a group size
    that does not divide the width, rows that are not whole bytes, a head with a bias."""
    config = get_method("rtn").make_config(config)
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise QuantizationError(f"the input embedding is a {type(embedding).__name__}, not nn.Embedding; keep it dense "
                                "(no --embed-bits)")
    embedding_scale(embedding)
    QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, config, device="meta")
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and not _head_is_tied(model, embedding, head) and head.bias is not None:
        raise QuantizationError("the output head has a bias; keep it dense (no --embed-bits)")


def quantize_embeddings(model: nn.Module, config: Any) -> dict[str, Any]:
    """Quantize the input embedding (and the output head: tied, from the same payload;
    untied, a payload of its own) of a transformers causal LM in place, round-to-nearest
    with the RTN `config`; returns the record `install_embeddings` rebuilds it from."""
    check_embeddings(model, config)
    config = get_method("rtn").make_config(config)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names[id(embedding)]
    head_name = names.get(id(head)) if isinstance(head, nn.Linear) else None
    tied = _head_is_tied(model, embedding, head)
    scale = embedding_scale(embedding)
    weight = embedding.weight.detach()
    packed = QuantizedEmbedding(*weight.shape, config, dtype=weight.dtype, name=emb_name, embed_scale=scale)
    packed.set_payload(quantize_table(weight, config))
    replace_linear(model, emb_name, packed.to(weight.device))
    if head_name is not None:
        if tied:
            replace_linear(model, head_name, TiedHead(packed))
        else:
            table = QuantizedEmbedding(*head.weight.shape, config, dtype=head.weight.dtype, name=head_name)
            table.set_payload(quantize_table(head.weight, config))
            replace_linear(model, head_name, QuantizedHead(table.to(head.weight.device)))
    _untie(model)
    return {"config": asdict(config), "embedding": emb_name, "head": head_name, "tied": tied}


def _untie(model: nn.Module) -> None:
    """Drop transformers' tying of the head to the embedding: the quantized modules share
    (or own) their payloads themselves, and there is no `weight` left to tie. The config
    says so too (``tie_word_embeddings`` False; the record keeps "tied"), so that
    `tie_weights()` (lm-eval calls it) finds nothing to tie."""
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def embedding_record(record: Any) -> dict[str, Any]:
    """The checked record (CheckpointError naming the problem)."""
    if not isinstance(record, dict) or set(record) != {"config", "embedding", "head", "tied"}:
        raise CheckpointError("quantization_config: 'embeddings' must be an object with config, embedding, head and tied")
    if not isinstance(record["embedding"], str) or not (record["head"] is None or isinstance(record["head"], str)):
        raise CheckpointError("quantization_config: 'embeddings' names its modules with strings")
    if not isinstance(record["tied"], bool):
        raise CheckpointError("quantization_config: 'embeddings.tied' must be true or false")
    try:
        get_method("rtn").make_config(record["config"])
    except (QuantizationError, TypeError) as e:
        raise CheckpointError(f"quantization_config: embeddings.config: {e}") from None
    return record


def install_embeddings(model: nn.Module, record: dict[str, Any]) -> None:
    """Replace the embedding (and head) of a freshly built model by empty quantized modules
    as `record` says, for the payloads to be loaded into."""
    record = embedding_record(record)
    config = get_method("rtn").make_config(record["config"])
    embedding = _module(model, record["embedding"], nn.Embedding, "the embeddings record names embedding")
    try:
        packed = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, config,
                                    dtype=embedding.weight.dtype, device=embedding.weight.device,
                                    name=record["embedding"], embed_scale=embedding_scale(embedding))
    except QuantizationError as e:
        raise CheckpointError(f"embedding {record['embedding']!r}: {e}") from None
    replace_linear(model, record["embedding"], packed)
    if record["head"] is not None:
        head = _module(model, record["head"], nn.Linear, "the embeddings record names head")
        if record["tied"]:
            replace_linear(model, record["head"], TiedHead(packed))
        else:
            try:
                table = QuantizedEmbedding(head.out_features, head.in_features, config, dtype=head.weight.dtype,
                                           device=head.weight.device, name=record["head"])
            except QuantizationError as e:
                raise CheckpointError(f"head {record['head']!r}: {e}") from None
            replace_linear(model, record["head"], QuantizedHead(table))
    _untie(model)
