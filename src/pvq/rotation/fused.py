"""Fused randomized-Hadamard rotation of a Llama-family model (QuaRot-style, weights only).

`rotate_model(model, seed)` changes the weights (and, for the online transforms, the
structure) of a causal LM so that it computes the same function while every quantized
linear sees rotated, incoherent weights (paper section 2.3; step 1 of section 3.3).
Hidden states are row vectors x, a linear is y = x W^T + b.

1. Untie. The head receives the final norm's scale below, so a tied head gets its own
   weight and ``config.tie_word_embeddings`` becomes False.
2. Fold the RMSNorm scales into the linears that read the normed stream:
   W <- W diag(g) for q/k/v (input_layernorm), gate/up (post_attention_layernorm) and the
   head (final norm); the norm weights become ones. RMSNorm(x) = x / rms(x) then has no
   parameters, and rms(x Q) = rms(x) for an orthogonal Q, so it commutes with Q.
3. Rotate the residual stream by one orthogonal Q = diag(s) H_d / sqrt(d) (d the hidden
   size): embedding E <- E Q; every linear reading the stream (q, k, v, gate, up, head)
   W <- W Q; every linear writing to it (o_proj, down_proj) W <- Q^T W, b <- b Q.
4. Per head, values and attention outputs: with one head_dim rotation P per layer,
   v_proj's rows of every KV head W_v[h] <- P^T W_v[h] (b_v[h] <- b_v[h] P), o_proj's
   columns of every attention head W_o[:, h] <- W_o[:, h] P. The attention weights mix
   value vectors linearly per head, so head h's output is rotated by P too and o_proj
   undoes it; with grouped-query attention every head uses the same P, so the KV head
   an attention head reads does not matter. q/k (and RoPE) are untouched.
5. Online Hadamard before down_proj: the SiLU-gated product is not a rotated stream, so
   a randomized Hadamard R of the intermediate size is applied to down_proj's input in
   the forward pass (an `OnlineHadamard`, the ``input_rotation`` child of down_proj
   applied by its input-transform pre-hook, `pvq.methods.input_transforms`; computed by
   the fast transform) and down_proj's weight is pre-multiplied: W_d <- Q^T W_d R. For weight
   quantization this is the only place the layout needs one (QuaRot's other online
   transforms serve activation / KV-cache quantization).

All products are computed in float64 and cast back to the model's dtype; the float32
benchmark model's logits move by ~1e-6 relative (tests/test_rotation.py).

The rotation is described by a JSON-ready record (`rotation_of(model)`): seed, the
size, construction and digest of every rotation, which online transforms exist. A
packed checkpoint stores it; `install_rotation(model, record)` rebuilds the online
transforms of a freshly built model (checking every rotation against its digest), so a
rotated quantized model loads with no extra arguments.

The layout is data (`RotationLayout`, part of each architecture's description in
`pvq.models.adapters`); a model whose description has none (the description says why),
or whose modules do not look like the layout says (an RMSNorm that is not one, an MLP
of another kind, inconsistent head sizes), gets an `UnsupportedArchitectureError`
naming the architecture and what is missing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pvq.models.adapters import (
    ArchitectureAdapter,
    RotationLayout,
    UnsupportedArchitectureError,
    adapter_for,
)

from pvq.methods.input_transforms import INPUT_TRANSFORMS, attach_input_transform

from .hadamard import RandomizedHadamard, RotationError, hadamard_transform

__all__ = [
    "ONLINE_ATTRIBUTE",
    "RECORD_KIND",
    "OnlineHadamard",
    "install_rotation",
    "refresh_online_transforms",
    "rotate_model",
    "rotation_layout_for",
    "rotation_of",
]

RECORD_KIND = "fused-randomized-hadamard"
RECORD_VERSION = 1
ONLINE_ATTRIBUTE = INPUT_TRANSFORMS[0]  # "input_rotation", child of down_proj holding the online transform
_MODEL_ATTRIBUTE = "_pvq_rotation"




# =========================================================================== online transform


class OnlineHadamard(nn.Module):
    """x -> x R for a randomized Hadamard R (computed in float32 or wider, returned in x's
    dtype). Its signs and K-factor are non-persistent buffers: rebuilt from the rotation
    record, never part of the state_dict."""

    def __init__(self, rotation: RandomizedHadamard) -> None:
        super().__init__()
        self.n = rotation.n
        self.label = rotation.label
        self.register_buffer("signs", rotation.signs.to(torch.float32), persistent=False)
        if rotation.K_matrix is not None:
            self.register_buffer("K_matrix", rotation.K_matrix.to(torch.float32), persistent=False)
        else:
            self.K_matrix = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        y = x.to(work) * self.signs.to(work)
        K = None if self.K_matrix is None else self.K_matrix.to(work)
        return (hadamard_transform(y, K) / math.sqrt(self.n)).to(x.dtype)

    def extra_repr(self) -> str:
        K = 1 if self.K_matrix is None else self.K_matrix.shape[0]
        return f"n={self.n}, K={K}, label={self.label!r}"


def _install_online(layer: nn.Module, rotation: RandomizedHadamard) -> None:
    """The layer (down_proj) multiplies x R instead of x: an input transform, no class change."""
    device = next((t.device for t in [*layer.parameters(), *layer.buffers()]), torch.device("cpu"))
    if device.type == "meta":  # a model being loaded: the transform is built on the host, moved after loading
        device = torch.device("cpu")
    attach_input_transform(layer, ONLINE_ATTRIBUTE, OnlineHadamard(rotation).to(device))


# =========================================================================== layout checks


def _arch(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {model_type!r})"


def _get(model: nn.Module, path: str, what: str, layout: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"cannot rotate {_arch(model)}: the {layout!r} rotation layout needs {what} {path!r}, which the model lacks"
        ) from None


def _check_rmsnorm(model: nn.Module, norm: nn.Module, path: str, size: int, layout: str, values: bool = True) -> None:
    """The module computes x / sqrt(mean(x^2) + eps) * weight (checked numerically), with
    a weight of the hidden size and no bias: the only norm the rotation commutes with."""
    w = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    problem = None
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (size,):
        problem = f"has no weight of shape ({size},)"
    elif isinstance(bias, torch.Tensor):
        problem = "has a bias (a LayerNorm, not an RMSNorm)"
    elif not isinstance(eps, (float, int)):
        problem = "has no epsilon (variance_epsilon / eps)"
    elif values:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(3, size, generator=g).to(w.device, w.dtype) * 3 + 1
            got = norm(x).to(torch.float64)
            x64 = x.to(torch.float64)
            want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.to(torch.float64)
            tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
            if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
                problem = "does not compute x / rms(x) * weight"
    if problem:
        raise UnsupportedArchitectureError(
            f"cannot rotate {_arch(model)}: {path} ({type(norm).__name__}) {problem}; the {layout!r} rotation "
            "layout folds RMSNorm scales into the next linears and needs exactly an RMSNorm there"
        )


def rotation_layout_for(model: nn.Module, check_values: bool = True) -> tuple[ArchitectureAdapter, RotationLayout]:
    """(adapter, layout) for `model`, after checking the model has every module the rotation
    touches with consistent sizes; UnsupportedArchitectureError naming what is missing.
    `check_values`: also run every norm once to check it is an RMSNorm (needs real weights)."""
    try:
        adapter = adapter_for(model)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: {e}") from None
    layout = adapter.rotation
    if layout is None:
        raise UnsupportedArchitectureError(
            f"cannot rotate {_arch(model)}: {adapter.rotation_refusal or 'its description has no rotation layout'}")
    L = adapter.name
    emb = _get(model, adapter.embedding, "the token embedding", L)
    head = _get(model, adapter.head, "the head", L)
    if not isinstance(emb, nn.Embedding):
        raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: {adapter.embedding} is {type(emb).__name__}, not nn.Embedding")
    if not isinstance(head, nn.Linear):
        raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: {adapter.head} is {type(head).__name__}, not nn.Linear")
    d = emb.embedding_dim
    if head.in_features != d:
        raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: head input {head.in_features} != hidden size {d}")
    _check_rmsnorm(model, _get(model, adapter.final_norm, "the final norm", L), adapter.final_norm, d, L, check_values)
    config = model.config
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if not isinstance(n_heads, int) or not isinstance(n_kv, int) or n_heads < 1 or n_kv < 1 or n_heads % n_kv:
        raise UnsupportedArchitectureError(
            f"cannot rotate {_arch(model)}: config needs num_attention_heads and num_key_value_heads "
            f"(a divisor of it), got {n_heads!r} and {n_kv!r}"
        )
    for i, block in enumerate(adapter.get_blocks(model)):
        prefix = adapter.block_prefix(i)
        for path in (*layout.attn_inputs, layout.attn_output, *layout.mlp_inputs, layout.mlp_output):
            try:
                adapter.block_linear(block, i, path)
            except UnsupportedArchitectureError as e:
                raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: {e}") from None
        for path in (layout.input_norm, layout.post_norm):
            try:
                norm = block.get_submodule(path)
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"cannot rotate {_arch(model)}: decoder block {prefix} has no {path!r} (rotation layout {L!r})"
                ) from None
            _check_rmsnorm(model, norm, f"{prefix}.{path}", d, L, check_values)
        for path in (*layout.attn_inputs, *layout.mlp_inputs):
            if block.get_submodule(path).in_features != d:
                raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: {prefix}.{path} does not read the hidden size {d}")
        for path in (layout.attn_output, layout.mlp_output):
            if block.get_submodule(path).out_features != d:
                raise UnsupportedArchitectureError(f"cannot rotate {_arch(model)}: {prefix}.{path} does not write the hidden size {d}")
        v, o = block.get_submodule(layout.value), block.get_submodule(layout.attn_output)
        if v.out_features % n_kv or o.in_features != n_heads * (v.out_features // n_kv):
            raise UnsupportedArchitectureError(
                f"cannot rotate {_arch(model)}: {prefix}: {layout.value} has {v.out_features} outputs and "
                f"{layout.attn_output} {o.in_features} inputs, not {n_kv} and {n_heads} heads of one head_dim"
            )
    return adapter, layout


# =========================================================================== the rotation


def rotation_of(model: nn.Module) -> dict[str, Any] | None:
    """The rotation record of a rotated model (a JSON-ready dict), or None."""
    return getattr(model, _MODEL_ATTRIBUTE, None)


def _sizes(model: nn.Module, adapter: ArchitectureAdapter, layout: RotationLayout) -> dict[str, int]:
    blocks = adapter.get_blocks(model)
    v = blocks[0].get_submodule(layout.value)
    n_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    return {
        "hidden_size": model.get_submodule(adapter.embedding).embedding_dim,
        "head_dim": v.out_features // n_kv,
        "intermediate_size": blocks[0].get_submodule(layout.mlp_output).in_features,
        "num_layers": len(blocks),
    }


_DENSE_LIMIT = 4096  # offline (fused) products use the dense matrix up to this size: BLAS beats the butterflies


class _Offline:
    """x @ R for the fused (offline) products: a dense float64 matmul for n <= _DENSE_LIMIT,
    otherwise the fast transform (the same result up to rounding)."""

    def __init__(self, rotation: RandomizedHadamard) -> None:
        self.rotation = rotation
        self._dense = rotation.matrix() if rotation.n <= _DENSE_LIMIT else None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            return self.rotation.apply(x)
        return x @ self._dense.to(x.device)


def _plan(seed: int, sizes: dict[str, int], online: bool, warn: bool) -> dict[str, Any]:
    """Every rotation of the record, built: {"residual", "v_o": [per layer], "online": [per layer] | None}."""
    L = sizes["num_layers"]
    return {
        "residual": RandomizedHadamard.build(sizes["hidden_size"], seed, "residual", warn=warn),
        "v_o": [RandomizedHadamard.build(sizes["head_dim"], seed, f"layers.{i}.v_o", warn=warn and i == 0) for i in range(L)],
        "online": [RandomizedHadamard.build(sizes["intermediate_size"], seed, f"layers.{i}.down_proj_input", warn=warn and i == 0)
                   for i in range(L)] if online else None,
    }


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, *, online_down_proj: bool = True) -> dict[str, Any]:
    """Rotate `model` in place (see the module docstring) and return its rotation record.

    The float model computes the same function afterwards (up to rounding of the rotated
    weights to the model's dtype). `online_down_proj=False` leaves out step 5 (down_proj
    then only gets the residual rotation on its output side)."""
    if rotation_of(model) is not None:
        raise RotationError(f"{_arch(model)} is already rotated (seed {rotation_of(model)['seed']})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RotationError(f"rotation seed must be a non-negative integer, got {seed!r}")
    adapter, layout = rotation_layout_for(model)
    sizes = _sizes(model, adapter, layout)
    plan = _plan(seed, sizes, online_down_proj, warn=True)
    Q = _Offline(plan["residual"])
    n_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    hd = sizes["head_dim"]

    def f64(t):
        return t.detach().to(torch.float64)

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(param.dtype))

    def read_rotated(lin: nn.Linear, scale: torch.Tensor | None) -> None:
        W = f64(lin.weight)
        if scale is not None:
            W = W * scale[None, :]
        put(lin.weight, Q.apply(W))  # W diag(g) Q

    def write_rotated(lin: nn.Linear, W: torch.Tensor) -> None:
        put(lin.weight, Q.apply(W.T).T)  # Q^T W
        if lin.bias is not None:
            put(lin.bias, Q.apply(f64(lin.bias)))  # b Q

    # 1. untie
    emb = model.get_submodule(adapter.embedding)
    head = model.get_submodule(adapter.head)
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    # 2 + 3. embedding, head (final norm folded)
    put(emb.weight, Q.apply(f64(emb.weight)))
    final_norm = model.get_submodule(adapter.final_norm)
    read_rotated(head, f64(final_norm.weight))
    final_norm.weight.fill_(1.0)
    for i, block in enumerate(adapter.get_blocks(model)):
        for norm_path, readers in ((layout.input_norm, layout.attn_inputs), (layout.post_norm, layout.mlp_inputs)):
            norm = block.get_submodule(norm_path)
            g = f64(norm.weight)
            for path in readers:
                read_rotated(block.get_submodule(path), g)
            norm.weight.fill_(1.0)
        # 4. values / attention outputs per head
        P = _Offline(plan["v_o"][i])
        v, o = block.get_submodule(layout.value), block.get_submodule(layout.attn_output)
        Wv = f64(v.weight).view(n_kv, hd, -1)  # (kv, hd, d): P^T W_v[h] = (W_v[h]^T P)^T
        put(v.weight, P.apply(Wv.transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape))
        if v.bias is not None:
            put(v.bias, P.apply(f64(v.bias).view(n_kv, hd)).reshape(-1))
        Wo = f64(o.weight)
        Wo = P.apply(Wo.view(Wo.shape[0], -1, hd)).reshape(Wo.shape)  # W_o[:, h] P
        write_rotated(o, Wo)
        # 5. down_proj: Q^T W_d R, with x -> x R online
        down = block.get_submodule(layout.mlp_output)
        Wd = f64(down.weight)
        if plan["online"] is not None:
            R = plan["online"][i]
            Wd = R.apply(Wd)  # few rows: the fast transform beats building the dense matrix
            _install_online(down, R)
        write_rotated(down, Wd)

    record = _record(model, adapter, layout, seed, sizes, plan, tied)
    setattr(model, _MODEL_ATTRIBUTE, record)
    return record


def _record(model, adapter, layout, seed, sizes, plan, tied) -> dict[str, Any]:
    online = {}
    if plan["online"] is not None:
        for i, R in enumerate(plan["online"]):
            online[adapter.layer_name(i, layout.mlp_output)] = R.record()
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "architecture": adapter.name,
        "model_type": getattr(model.config, "model_type", None),
        "seed": seed,
        **sizes,
        "folded_norms": True,
        "untied_embeddings": bool(tied),
        "residual": plan["residual"].record(),
        "v_o": [P.record() for P in plan["v_o"]],
        "online": online,
    }


# =========================================================================== rebuild on load


def _need(record: dict, key: str, kind: type | tuple[type, ...]):
    if key not in record:
        raise RotationError(f"rotation record lacks {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise RotationError(f"rotation record field {key!r} is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def install_rotation(model: nn.Module, record: dict[str, Any]) -> None:
    """Give a freshly built model (e.g. from a checkpoint's config) the structure of the
    rotated model `record` describes: every recorded rotation is rebuilt and checked
    against its digest, the online transforms are installed, the record is attached.
    The (already rotated) weights are loaded afterwards. RotationError if the record
    cannot be rebuilt; UnsupportedArchitectureError if the model's layout is unknown."""
    if not isinstance(record, dict):
        raise RotationError(f"rotation record is a {type(record).__name__}, not an object")
    kind = record.get("kind")
    if kind != RECORD_KIND:
        raise RotationError(f"unknown rotation kind {kind!r} (this pvq rebuilds {RECORD_KIND!r})")
    version = _need(record, "version", int)
    if version > RECORD_VERSION:
        raise RotationError(f"rotation record version {version} is newer than this pvq ({RECORD_VERSION}); upgrade pvq")
    if rotation_of(model) is not None:
        raise RotationError(f"{_arch(model)} already carries a rotation")
    seed = _need(record, "seed", int)
    adapter, layout = rotation_layout_for(model, check_values=False)
    if record.get("architecture") != adapter.name:
        raise RotationError(
            f"rotation record is for layout {record.get('architecture')!r}, {_arch(model)} has layout {adapter.name!r}"
        )
    blocks = adapter.get_blocks(model)
    sizes = _sizes(model, adapter, layout)
    for key, value in sizes.items():
        if _need(record, key, int) != value:
            raise RotationError(f"rotation record has {key} {record[key]}, the model has {value}")
    online = _need(record, "online", dict)
    v_o = _need(record, "v_o", list)
    residual = _need(record, "residual", dict)
    if len(v_o) != len(blocks):
        raise RotationError(f"rotation record has {len(v_o)} per-head rotations, the model has {len(blocks)} layers")
    checks = [(residual, "residual", sizes["hidden_size"])]
    checks += [(r, f"layers.{i}.v_o", sizes["head_dim"]) for i, r in enumerate(v_o)]
    names = [adapter.layer_name(i, layout.mlp_output) for i in range(len(blocks))]
    if online and sorted(online) != sorted(names):
        raise RotationError(
            f"rotation record has online transforms for {sorted(online)[:4]}..., expected one per layer on {layout.mlp_output}"
        )
    checks += [(online[name], f"layers.{i}.down_proj_input", sizes["intermediate_size"]) for i, name in enumerate(names) if online]
    built = []
    for rec, label, n in checks:
        if not isinstance(rec, dict) or rec.get("label") != label or rec.get("n") != n or rec.get("seed") != seed:
            got = {k: rec.get(k) for k in ("label", "n", "seed")} if isinstance(rec, dict) else rec
            raise RotationError(f"rotation record entry {got!r} is not rotation {label!r} of size {n} with seed {seed}")
        built.append(RandomizedHadamard.from_record(rec))
    if online:
        for i, name in enumerate(names):
            _install_online(blocks[i].get_submodule(layout.mlp_output), built[1 + len(blocks) + i])
    setattr(model, _MODEL_ATTRIBUTE, dict(record))


def refresh_online_transforms(model: nn.Module) -> None:
    """Build the online transforms of a rotated model again from its record, on the
    device of their layers. transformers' ``from_pretrained`` re-materialises
    non-persistent buffers after loading (without their values); the pvq quantizer
    calls this once the weights are in place."""
    record = rotation_of(model)
    if record is None:
        return
    for name, rec in (record.get("online") or {}).items():
        layer = model.get_submodule(name)
        if layer._modules.get(ONLINE_ATTRIBUTE) is None:
            raise RotationError(f"{name!r} has no online transform to refresh")
        device = next((t.device for t in [*layer.parameters(), *layer.buffers()] if t.device.type != "meta"),
                      torch.device("cpu"))
        layer._modules[ONLINE_ATTRIBUTE] = OnlineHadamard(RandomizedHadamard.from_record(rec)).to(device)
