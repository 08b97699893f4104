"""Triton kernels of PVQ layers (GPU; tested on the CPU with ``TRITON_INTERPRET=1``).

Each program decodes a block of one output row's groups straight from the packed
payload (split-order codes of D = 4, 8 or 16, fp16 gains or gain indices), vectorised
over the groups, with the same tables as the CPU codec (`pvq.codec.split`):

* ``pvq_kernel`` with GEMV (batch <= 16): multiplies the decoded block with every token
  and adds the row's partial sums into the output (no weight is formed);
* ``pvq_kernel`` without: writes the block's weights into a workspace for `F.linear`
  (prefill).

Node searches are branch-free counts over the offset table (O(K) per node: no
data-dependent loop on a GPU), divisions are int64. Weights are ``p_i * (gain / ||p||)``
in float32, as on the CPU. Imported only when a layer runs on CUDA or a test asks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pvq.codec.split import split_tables
from pvq.methods.pvq import gain_tables

from pvq.runtime.cpu_kernels import refusal

__all__ = ["TRITON_DIMENSIONS", "TritonState", "triton_decode", "triton_gemv", "triton_state", "triton_refusal"]

#: Dimensions with a Triton decoder (every leaf of 4 coordinates from the table).
TRITON_DIMENSIONS = (4, 8, 16)
_BLOCK_G = 32


@triton.jit
def _read_bits(stream_ptr, stream_len, bitpos, NBITS: tl.constexpr):
    byte = bitpos >> 3
    shift = bitpos & 7
    v = tl.zeros(bitpos.shape, tl.int64)
    for i in tl.static_range(8):
        idx = byte + i
        b = tl.load(stream_ptr + idx, mask=idx < stream_len, other=0).to(tl.int64)
        v = v | (b << (8 * i))
    # bits above 63 are never needed: NBITS + shift <= 60
    return (v >> shift) & ((1 << NBITS) - 1)


@triton.jit
def _split(c, k, t, of_ptr, dv_ptr, KMAX: tl.constexpr):
    """(kl, left code, right code) of node kind t: kl = #{j in 1..k : c >= Off(j)}."""
    row = (t * (KMAX + 1) + k) * (KMAX + 2)
    kl = tl.zeros(c.shape, tl.int64)
    for j in tl.static_range(1, KMAX + 1):
        off = tl.load(of_ptr + row + j, mask=j <= k, other=0)
        kl += ((j <= k) & (c >= off)).to(tl.int64)
    c = c - tl.load(of_ptr + row + kl)
    d = tl.load(dv_ptr + (t * (KMAX + 1) + k) * (KMAX + 1) + kl)
    q = c // d
    return kl, q, c - q * d


@triton.jit
def _leaf(P, c, k, POS: tl.constexpr, lb_ptr, lp_ptr, cols):
    e = tl.load(lb_ptr + k) + c
    for j in tl.static_range(4):
        v = tl.load(lp_ptr + e * 4 + j).to(tl.float32)
        P += tl.where(cols == POS + j, v[:, None], 0.0)
    return P


@triton.jit
def _decode_block(codes_ptr, codes_len, flat, mask, of_ptr, dv_ptr, lb_ptr, lp_ptr, T8, T16, cols,
                  D: tl.constexpr, K: tl.constexpr, NBITS: tl.constexpr, BLOCK: tl.constexpr):
    """Points (BLOCK, D) float32 of the codes at flat indices `flat`; also whether each is in range."""
    c = _read_bits(codes_ptr, codes_len, flat.to(tl.int64) * NBITS, NBITS)
    P = tl.zeros((BLOCK, D), tl.float32)
    k = tl.full((BLOCK,), K, tl.int64)
    if D == 16:
        total = tl.load(of_ptr + (T16 * (K + 1) + K) * (K + 2) + K + 1)
        ok = c < total
        c = tl.where(ok & mask, c, 0)
        kl, cl, cr = _split(c, k, T16, of_ptr, dv_ptr, K)
        ka, a0, a1 = _split(cl, kl, T8, of_ptr, dv_ptr, K)
        kb, b0, b1 = _split(cr, k - kl, T8, of_ptr, dv_ptr, K)
        P = _leaf(P, a0, ka, 0, lb_ptr, lp_ptr, cols)
        P = _leaf(P, a1, kl - ka, 4, lb_ptr, lp_ptr, cols)
        P = _leaf(P, b0, kb, 8, lb_ptr, lp_ptr, cols)
        P = _leaf(P, b1, k - kl - kb, 12, lb_ptr, lp_ptr, cols)
    elif D == 8:
        total = tl.load(of_ptr + (T8 * (K + 1) + K) * (K + 2) + K + 1)
        ok = c < total
        c = tl.where(ok & mask, c, 0)
        kl, cl, cr = _split(c, k, T8, of_ptr, dv_ptr, K)
        P = _leaf(P, cl, kl, 0, lb_ptr, lp_ptr, cols)
        P = _leaf(P, cr, k - kl, 4, lb_ptr, lp_ptr, cols)
    else:
        total = tl.load(lb_ptr + K + 1) - tl.load(lb_ptr + K)
        ok = c < total
        c = tl.where(ok & mask, c, 0)
        P = _leaf(P, c, k, 0, lb_ptr, lp_ptr, cols)
    return P, ok | (mask == 0)


@triton.jit
def _scales(P, r, g, mask, G, gains_ptr, gidx_ptr, gidx_len, cb_ptr, rs_ptr, GAIN_MODE: tl.constexpr,
            GBITS: tl.constexpr):
    ss = tl.sum(P * P, axis=1)
    if GAIN_MODE == 0:
        gain = tl.load(gains_ptr + r * G + g, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        idx = _read_bits(gidx_ptr, gidx_len, (r * G + g).to(tl.int64) * GBITS, GBITS)
        gain = tl.load(cb_ptr + idx, mask=mask, other=0.0) * tl.load(rs_ptr + r)
    return gain / tl.sqrt(tl.maximum(ss, 1.0))


@triton.jit
def pvq_kernel(x_ptr, out_ptr, w_ptr, bad_ptr, codes_ptr, codes_len, of_ptr, dv_ptr, lb_ptr, lp_ptr, T8, T16,
               gains_ptr, gidx_ptr, gidx_len, cb_ptr, rs_ptr, R, G,
               D: tl.constexpr, K: tl.constexpr, NBITS: tl.constexpr, GAIN_MODE: tl.constexpr,
               GBITS: tl.constexpr, B: tl.constexpr, BLOCK: tl.constexpr, GEMV: tl.constexpr):
    """One block of one output row: GEMV adds sum_g scale_g <p_g, x_g> into out[:, r];
    otherwise the block's weights go to w[r]."""
    r = tl.program_id(0)
    g = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = g < G
    cols = tl.arange(0, D)[None, :]
    P, ok = _decode_block(codes_ptr, codes_len, r * G + g, mask, of_ptr, dv_ptr, lb_ptr, lp_ptr, T8, T16, cols,
                          D, K, NBITS, BLOCK)
    tl.atomic_max(bad_ptr, tl.max((ok == 0).to(tl.int32)))
    scale = _scales(P, r, g, mask, G, gains_ptr, gidx_ptr, gidx_len, cb_ptr, rs_ptr, GAIN_MODE, GBITS)
    if GEMV:
        C = G * D
        for b in tl.static_range(B):
            xg = tl.load(x_ptr + b * C + g[:, None] * D + cols, mask=mask[:, None], other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(P * xg, axis=1) * scale, axis=0)
            tl.atomic_add(out_ptr + b * R + r, part)
    else:
        tl.store(w_ptr + r * (G * D) + g[:, None] * D + cols, P * scale[:, None], mask=mask[:, None])


class TritonState:
    """Device tensors one layer's kernels read (tables, payload views), cached on the layer."""

    def __init__(self, layer, key: tuple) -> None:
        lay = layer.layout
        D, G, K, nbits = (int(lay[k]) for k in ("group_size", "num_groups", "pulses", "code_bits"))
        dev = layer.codes.device
        tb = split_tables(D, K)
        kinds = tb.kind_of_length
        self.key = key
        self.D, self.G, self.K, self.nbits, self.R = D, G, K, nbits, layer.out_features
        # node kinds of the 8- and 16-wide levels (the 4-wide leaves read the table directly)
        self.kinds = tuple(int(kinds[n]) if n < kinds.shape[0] and kinds[n] >= 0 else 0 for n in (8, 16))
        to = lambda a: torch.from_numpy(a).contiguous().to(dev)
        self.offsets = to(tb.offsets)
        self.divisors = to(tb.divisors)
        self.leaf_base = to(tb.leaf_base)
        self.leaf_points = to(tb.leaf_points)
        self.codes = layer.codes
        zero8 = torch.zeros(8, dtype=torch.uint8, device=dev)
        if lay["gain"] == "fp16":
            self.gain_mode, self.gbits = 0, 1
            self.gains, self.gidx = layer.gains, zero8
            self.codebook = self.row_scale = torch.zeros(1, dtype=torch.float32, device=dev)
        else:
            self.gain_mode, self.gbits = 1, int(lay["gain_bits"])
            self.gains, self.gidx = torch.zeros(1, dtype=torch.int16, device=dev), layer.gain_indices
            codebook, row_scale = gain_tables(lay, layer.payload(), self.R)
            self.codebook = torch.from_numpy(codebook).to(torch.float32).to(dev)
            self.row_scale = torch.from_numpy(row_scale).to(torch.float32).to(dev)

    def args(self) -> tuple:
        return (self.codes, self.codes.numel(), self.offsets, self.divisors, self.leaf_base, self.leaf_points,
                *self.kinds, self.gains, self.gidx, self.gidx.numel(), self.codebook, self.row_scale, self.R, self.G)

    def constants(self) -> dict:
        return {"D": self.D, "K": self.K, "NBITS": self.nbits, "GAIN_MODE": self.gain_mode, "GBITS": self.gbits}


def triton_refusal(layer) -> str | None:
    """None if the Triton kernels serve this PVQ layer, else why not."""
    if layer.method != "pvq":
        return f"method {layer.method}"
    why = refusal(layer)
    if why is not None:
        return why
    if layer.layout.get("gain_escapes"):
        return "PVQ gain escapes (the CPU kernels serve them)"
    D, K = int(layer.layout["group_size"]), int(layer.layout["pulses"])
    if D not in TRITON_DIMENSIONS or split_tables(D, K).leaf_kmax < K:
        return f"D={D}, K={K} (the Triton decoder takes D in {TRITON_DIMENSIONS} with every leaf tabulated)"
    return None


def triton_state(layer) -> TritonState:
    key = layer.payload_key()
    state = layer.__dict__.get("_triton_state")
    if state is None or state.key != key:
        state = TritonState(layer, key)
        layer._triton_state = state
    return state


def _check_bad(layer, bad: torch.Tensor) -> None:
    if int(bad.item()):
        from pvq.runtime.errors import LayerCodecError

        raise LayerCodecError(f"{layer._label()}: a stored code is out of range [0, N({layer.layout['group_size']},"
                              f"{layer.layout['pulses']})): the payload is damaged")


def triton_gemv(layer, x2: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, R) float32 with the fused kernel (compiled per B; `kernels.TRITON_GEMV_MAX_ROWS` at most)."""
    st = triton_state(layer)
    B = x2.shape[0]
    out = torch.zeros((B, st.R), dtype=torch.float32, device=x2.device)
    bad = torch.zeros(1, dtype=torch.int32, device=x2.device)
    grid = (st.R, triton.cdiv(st.G, _BLOCK_G))
    pvq_kernel[grid](x2.contiguous(), out, out, bad, *st.args(), **st.constants(), B=B, BLOCK=_BLOCK_G, GEMV=True)
    _check_bad(layer, bad)
    return out


def triton_decode(layer, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's float32 weight (R, C) decoded on its device."""
    st = triton_state(layer)
    w = out if out is not None else torch.empty((st.R, st.G * st.D), dtype=torch.float32, device=layer.codes.device)
    bad = torch.zeros(1, dtype=torch.int32, device=w.device)
    grid = (st.R, triton.cdiv(st.G, _BLOCK_G))
    pvq_kernel[grid](w, w, w, bad, *st.args(), **st.constants(), B=1, BLOCK=_BLOCK_G, GEMV=False)
    _check_bad(layer, bad)
    return w
