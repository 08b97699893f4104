"""Pyramid Vector Quantization of a layer, with Hessian error feedback (paper section 3.3).

Each row of W (R x C) is cut into G = C / D groups of D consecutive input columns; each
group vector w is stored as a *shape*, a point p of the pyramid P(D, K) (its Fischer
code, `pvq.codec`), and a *gain* s: ``w_hat = s * p / ||p||``.

Algorithm (blocks b = the D columns of one group, left to right):

1. ``H^{-1} = U^T U`` (`pvq.methods.hessian`, damped; dead columns of W zeroed).
2. Shape: every row's D-vector of the current, error-corrected block W_b is mapped to the
   pyramid point of maximal cosine (`pvq.codec.search`, float64).
3. `hessian_refine` (default on): single-pulse moves from the cosine-optimal point that
   lower the block loss ``min_s ||(w - s u) A||^2`` (see `_refine_rows`). On synthetic
   1536 x 576 layers (`pvq.methods.synthetic`, 3-bit shapes) it cut the proxy loss by
   7-46% (D=64, fp16 gains) and 1-21% (D=16, Beta gains), the more the more
   anisotropic the Hessian, for about 1.4x the time of PVQ without it.
4. Gain: for the unit shape u, the loss of the block with optimal compensation of the
   later columns is ``||(w - s u) A||^2`` with ``A = U_bb^{-1}`` (GPTQ generalised to a
   block of D columns, as in GPTVQ), minimised by ``s = <wA, uA> / <uA, uA>``. Without
   the Hessian it is the least-squares gain ``<w, u>`` (the paper's step-4 formula is
   printed inverted). The gain is quantized *before* the error is formed, so the
   feedback compensates the gain's quantization error too:
   * ``"fp16"``: one float16 gain per group;
   * ``"beta"``: `gain_bits`-bit indices into the Beta(D/2, D(G-1)/2) codebook of
     `pvq.codec.BetaGainQuantizer` (quantile or centroid reconstruction), normalised by
     the squared norm of the *original* row, stored as one float16 norm per row. The
     index chosen is the codebook gain nearest to s, which is the optimum of the
     quadratic loss in s for this codebook (the paper's ``floor(CDF(u) 2^b)`` cell rule
     differs only near cell boundaries);
   * ``"empirical"`` (ours): as ``"beta"``, but the 2^gain_bits normalised gain levels
     are fitted per layer (Lloyd-Max on the layer's own g/||row||, stored as float16),
     because unrotated weights have far heavier-tailed group energies than the Beta law:
     with 4-bit Beta gains 7-11% of the benchmark model's D=16 groups land in the top
     cell with gain errors up to 180%.
   * escapes (``gain_escapes`` E > 0, with "beta" or "empirical"): up to E groups per row
     whose gain lies beyond the top level keep it exactly (float16), with their group
     position; the first E such groups of a row in processing order (act-order puts the
     high-energy groups first) take the slots. Their stored index is ignored.
5. Feedback: ``E = (W_b - Q_b) U_bb^{-1}`` (triangular solve) and
   ``W[:, after b] -= E @ U[b, after b]`` (the paper's step 6), in lazy blocks of about
   LAZY_BLOCK columns: the loop shared with GPTQ and GPTVQ,
   `pvq.methods.feedback.error_feedback`, with steps 2-4 as its step (`_GroupSteps`).
6. `act_order` (default on, with the Hessian): the groups are *processed* in order of
   decreasing Hessian energy tr(H_gg) (W and H permuted by whole groups, the results
   permuted back), GPTQ's act-order at the granularity of groups. Groups stay the same
   D consecutive input columns, so the stored layout and the dequantizer are unchanged
   and no permutation is stored. Why: a group fed by outlier input channels (8x the mean
   energy in the benchmark model's layer-0 o_proj) quantized last has no later columns
   to absorb its gain error; quantized first, its error is spread over all the others.
   On 20 layers of the benchmark model with their calibration Hessians (D=16, 3-bit
   shapes, 4-bit fitted gains) it lowered the summed proxy loss from 717 to 540
   (`python bench/layer_study.py`).

Stored tensors:
* ``codes``: the codes of the R*G shapes, row-major (row r, group g -> r*G + g), each
  ``code_bits(D, K)`` bits, bit-packed (`pvq.codec.pack_codes`), in the split order
  (`pvq.codec.split`, decodes several times faster) or Fischer's (layout "enumeration");
* fp16 gains: ``gains`` float16 (R, G);
* beta gains: ``gain_indices`` (R*G indices, row-major, bit-packed at gain_bits) and
  ``row_norms`` float16 (R,) (a row whose stored norm is 0 dequantizes to zeros);
* empirical gains: the same plus ``gain_codebook`` float16 (2^gain_bits,).
* escapes: ``escape_groups`` (R, E) uint8 (uint16 when G > 255), the stored group of each
  slot in increasing order, G in an unused slot; ``escape_gains`` float16 (R, E), 0 unused.
Dequantization: unpack, decode, ``u = p / ||p||`` (float64), times the gains, float32.
Nominal bits per weight (paper eq. 7): ``code_bits / D + gain_bits / D`` (16 for fp16),
plus the escape slots' bits per weight when the row length is given; the measured value
adds the row norms (16 bits per row) and byte padding.

Over 500 lines because it is one method's whole contract (config, layout, payload spec,
the quantizer's group step, dequantize, the tunable weight, the rate ladder) and the
refinement kernel that shares its helpers; the registry reads it as one module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from pvq.codec import (
    BetaGainQuantizer,
    code_bits,
    decode,
    empirical_gain_codebook,
    encode,
    nearest_level,
    pack_codes,
    packed_size,
    pulses_for_bits,
    search,
    unpack_codes,
)
from pvq.codec.counts import table_bytes
from pvq.codec.errors import CodecError
from pvq.codec.split import split_decode, split_encode, split_supported
from pvq.settings import NONNEGATIVE, POSITIVE, number, percdamp_field, setting

from pvq.methods.base import (
    QuantizationError,
    QuantizedTensor,
    TensorSpec,
    TunableWeight,
    as_float32,
    check_config,
    check_weight,
    is_int,
    lookup,
    predicted_change,
    proxy_loss,
    stored_float16,
)
from pvq.methods.feedback import act_order, error_feedback, lazy_blocks, prepare, restore_columns
from pvq.methods.hessian import check_percdamp, diagonal_block_inverses

__all__ = ["CONFIG", "PVQConfig", "dequantize", "layout", "needs_hessian", "nominal_bits_per_weight", "payload_spec",
           "quantize", "rate_ladder", "tunable"]

GAIN_FORMATS = ("fp16", "beta", "empirical")
RECONSTRUCTIONS = ("quantile", "centroid")
SEARCH_METHODS = ("refined", "greedy", "paper")
#: Code orders of the stored shapes: Fischer's (the paper's) or the split order, which
#: decodes several times faster (`pvq.codec.split`); "auto" is split where it applies
#: (codes below 2^53), else Fischer.
ENUMERATIONS = ("auto", "split", "fischer")
MAX_GAIN_BITS = 16
MAX_SHAPE_BITS = 8
#: Largest enumeration tables (both, bytes) a configuration may need.
MAX_TABLE_BYTES = 1 << 30
#: Columns per lazy feedback block (rounded to a multiple of D).
LAZY_BLOCK = 128


def check_gain_settings(gain_bits, reconstruction, error: type[Exception] = QuantizationError, what: str = "") -> None:
    """Gain index bits (1..MAX_GAIN_BITS) and Beta reconstruction, shared by weight and
    activation PVQ; `error`/`what` name the caller's error type and field prefix."""
    if not is_int(gain_bits) or not 1 <= gain_bits <= MAX_GAIN_BITS:
        raise error(f"{what}gain_bits must be an integer in 1..{MAX_GAIN_BITS}, got {gain_bits!r}")
    if reconstruction not in RECONSTRUCTIONS:
        raise error(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")


@dataclass(frozen=True)
class PVQConfig:
    """PVQ settings (see the module docstring).

    group_size: D, input columns per shape vector; shape_bits: bits per weight for the
    shape (fractional allowed; K = pulses_for_bits(D, shape_bits)); gain: "fp16", "beta"
    or "empirical" (levels fitted per layer); gain_bits: bits per gain index (beta and
    empirical); reconstruction ("centroid" | "quantile"): Beta gains only;
    use_hessian: error feedback and Hessian-optimal gains (False: plain PVQ with
    least-squares gains, no Hessian needed); percdamp: damping (fraction of the mean
    diagonal); search_method: codec shape search ("refined" | "greedy" | "paper");
    hessian_refine: refine shapes under the block metric (with use_hessian only);
    refine_candidates / refine_max_moves: its search width and move budget per vector;
    act_order: with the Hessian, process the groups in order of decreasing Hessian
    energy (the storage is unchanged, see the module docstring); enumeration: the code
    order of the stored shapes, one of ENUMERATIONS; gain_escapes: exact float16 gain
    slots per row for groups beyond the top gain level (codebook gains only).
    """

    group_size: int = setting(16, "PVQ dimension D: weights per group along the input", POSITIVE,
                              option="pvq_group_size")
    shape_bits: float = setting(3.0, "PVQ shape bits per weight, fractional allowed", number(above=0))
    gain: str = setting("empirical", "PVQ gain storage: float16, Beta-quantile indices, or per-layer fitted levels",
                        choices=GAIN_FORMATS)
    gain_bits: int = setting(4, "bits per PVQ gain index (beta, empirical)", POSITIVE)
    reconstruction: str = "centroid"
    use_hessian: bool = setting(True, "plain PVQ: no Hessian error feedback", option="no_hessian", negate=True)
    percdamp: float = percdamp_field()
    search_method: str = "refined"
    hessian_refine: bool = setting(True, "skip the Hessian-weighted shape refinement", option="no_refine",
                                   negate=True)
    refine_candidates: int = 8
    refine_max_moves: int = 64
    act_order: bool = True
    enumeration: str = setting("auto", "PVQ code order: split (fast kernels; codes up to 53 bits), fischer, or auto "
                               "(split where it fits)", choices=ENUMERATIONS)
    gain_escapes: int = setting(0, "PVQ beta/empirical gains: per row, this many groups beyond the top gain level "
                                "keep an exact float16 gain", NONNEGATIVE)

    def __post_init__(self) -> None:
        if not is_int(self.group_size) or self.group_size < 2:
            raise QuantizationError(f"group_size (D) must be an integer >= 2, got {self.group_size!r}")
        if isinstance(self.shape_bits, bool) or not isinstance(self.shape_bits, (int, float, np.integer, np.floating)):
            raise QuantizationError(f"shape_bits must be a number, got {self.shape_bits!r}")
        if not (math.isfinite(self.shape_bits) and 0 < self.shape_bits <= MAX_SHAPE_BITS):
            raise QuantizationError(f"shape_bits must be in (0, {MAX_SHAPE_BITS}], got {self.shape_bits!r}")
        if self.gain not in GAIN_FORMATS:
            raise QuantizationError(f"gain must be one of {GAIN_FORMATS}, got {self.gain!r}")
        check_gain_settings(self.gain_bits, self.reconstruction)
        for name in ("use_hessian", "hessian_refine", "act_order"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise QuantizationError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_percdamp(self.percdamp)
        if self.search_method not in SEARCH_METHODS:
            raise QuantizationError(f"search_method must be one of {SEARCH_METHODS}, got {self.search_method!r}")
        if not is_int(self.refine_candidates) or self.refine_candidates < 1:
            raise QuantizationError(f"refine_candidates must be an integer >= 1, got {self.refine_candidates!r}")
        if not is_int(self.refine_max_moves) or self.refine_max_moves < 0:
            raise QuantizationError(f"refine_max_moves must be an integer >= 0, got {self.refine_max_moves!r}")
        if self.pulses < 1:
            raise QuantizationError(
                f"shape_bits={self.shape_bits} buys no pulse for D={self.group_size} "
                f"(N(D, 1) = {2 * self.group_size} codes need log2({2 * self.group_size}) / D bits per weight)"
            )
        if not is_int(self.gain_escapes) or self.gain_escapes < 0:
            raise QuantizationError(f"gain_escapes must be an integer >= 0, got {self.gain_escapes!r}")
        if self.gain_escapes and self.gain == "fp16":
            raise QuantizationError("gain_escapes applies to codebook gains ('beta' or 'empirical'), not 'fp16'")
        if self.enumeration not in ENUMERATIONS:
            raise QuantizationError(f"enumeration must be one of {ENUMERATIONS}, got {self.enumeration!r}")
        if self.enumeration == "split" and not split_supported(int(self.group_size), self.pulses):
            raise QuantizationError(
                f"enumeration='split' keeps codes below 2^53; D={self.group_size}, K={self.pulses} needs "
                f"{self.code_bits} bits: use enumeration='fischer' (or 'auto')"
            )
        need = table_bytes(int(self.group_size), self.pulses)
        if need > MAX_TABLE_BYTES:
            raise QuantizationError(
                f"D={self.group_size} with shape_bits={self.shape_bits} (K={self.pulses}) needs "
                f"{need / 2**20:.0f} MiB of enumeration tables (limit {MAX_TABLE_BYTES >> 20} MiB); "
                "lower shape_bits or group_size"
            )

    @property
    def pulses(self) -> int:
        """K: the most pulses whose pyramid fits shape_bits * D bits."""
        try:
            return pulses_for_bits(int(self.group_size), float(self.shape_bits))
        except CodecError as e:
            raise QuantizationError(f"cannot size the pyramid: {e}") from None

    @property
    def code_bits(self) -> int:
        return code_bits(int(self.group_size), self.pulses)

    @property
    def code_order(self) -> str:
        """The enumeration the codes are stored in ("split" or "fischer"), "auto" resolved."""
        if self.enumeration == "auto":
            return "split" if split_supported(int(self.group_size), self.pulses) else "fischer"
        return self.enumeration


CONFIG = PVQConfig


def nominal_bits_per_weight(config: PVQConfig, columns: int | None = None) -> float:
    """Paper eq. 7 with the actual code width: code_bits(D, K) / D + gain bits / D.

    (`columns` is accepted for a signature common to all methods and not needed.)"""
    gain = 16 if config.gain == "fp16" else config.gain_bits
    bits = (config.code_bits + gain) / config.group_size
    if config.gain_escapes and columns:
        bits += config.gain_escapes * (16 + 8 * _escape_position_dtype(int(columns) // int(config.group_size)).itemsize) / int(columns)
    return bits


def _escape_position_dtype(G: int) -> np.dtype:
    """Stored dtype of escape group positions (G itself marks an unused slot)."""
    return np.dtype(np.uint8 if G <= 255 else np.uint16)


def needs_hessian(config: PVQConfig) -> bool:
    """Unless use_hessian is False (plain PVQ with least-squares gains)."""
    return bool(config.use_hessian)


def _groups(D: int, C: int) -> int:
    if C % D != 0:
        divisors = [d for d in range(2, C + 1) if C % d == 0]
        near = sorted(divisors, key=lambda d: (abs(d - D), d))[:2]
        raise QuantizationError(
            f"in_features C={C} is not divisible by group_size D={D}; pick a divisor of {C} "
            f"(nearest: {' or '.join(map(str, sorted(near)))})"
        )
    return C // D


def layout(config: PVQConfig, shape: tuple[int, int]) -> dict:
    """What the decoder reads: D, groups per row, K, code width and the gain format."""
    D = int(config.group_size)
    G = _groups(D, int(shape[1]))
    out = {
        "group_size": D,
        "num_groups": G,
        "pulses": int(config.pulses),
        "code_bits": int(config.code_bits),
        "gain": config.gain,
        "gain_bits": 16 if config.gain == "fp16" else int(config.gain_bits),
        "code_order": "row-major",
        "enumeration": config.code_order,
    }
    if config.gain == "beta":
        out["reconstruction"] = config.reconstruction
    if config.gain_escapes:
        out["gain_escapes"] = int(config.gain_escapes)
    return out


def payload_spec(config: PVQConfig, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """``codes`` (R*G Fischer codes bit-packed), then the gains of the chosen format (module docstring)."""
    R = int(shape[0])
    lay = layout(config, shape)
    G, gain_bits = lay["num_groups"], lay["gain_bits"]
    spec = {"codes": TensorSpec((packed_size(R * G, lay["code_bits"]),), "uint8")}
    if config.gain == "fp16":
        spec["gains"] = TensorSpec((R, G), "float16")
    else:
        spec["gain_indices"] = TensorSpec((packed_size(R * G, gain_bits),), "uint8")
        spec["row_norms"] = TensorSpec((R,), "float16")
        if config.gain == "empirical":
            spec["gain_codebook"] = TensorSpec((1 << gain_bits,), "float16")
        if config.gain_escapes:
            E = int(config.gain_escapes)
            spec["escape_groups"] = TensorSpec((R, E), _escape_position_dtype(G).name)
            spec["escape_gains"] = TensorSpec((R, E), "float16")
    return spec


# --------------------------------------------------------------------------- kernels


@njit(cache=True, inline="always")
def _keep_top(vals, idxs, n, ncand, v, k):
    """Insert (v, k) into the descending list vals/idxs of length n, kept to ncand
    entries; returns the new length."""
    if n < ncand:
        pos = n
        n += 1
    elif v > vals[n - 1]:
        pos = n - 1
    else:
        return n
    while pos > 0 and vals[pos - 1] < v:
        vals[pos] = vals[pos - 1]
        idxs[pos] = idxs[pos - 1]
        pos -= 1
    vals[pos] = v
    idxs[pos] = k
    return n


@njit(cache=True)
def _refine_rows(x, P, b, Mp, M, ncand, max_moves, rel_tol):
    """Refine pyramid points P (N, D) in place under the metric M (D x D, PSD).

    Maximises ``f(p) = <b, p>^2 / (p M p)`` (b = x M), i.e. minimises the loss
    ``(x - s p) M (x - s p)^T`` at its optimal gain s, over single-pulse moves: take
    one pulse off i (``p_i -= sign(p_i)``) and put one on j in the direction of the
    target (``p_j += sign(x_j)``, j with x_j != 0), so L1 = K and the signs of p stay
    those of x. Per step, the `ncand` most promising removals and additions by the
    first-order change of log f are paired and evaluated exactly (O(1) each, from
    ``Mp = p M``); the best strictly improving pair is applied. At most `max_moves`
    moves per vector. Rows with ``<b, p> <= 0`` are left alone. Returns total moves.
    """
    N, D = x.shape
    add_idx = np.empty(ncand, np.int64)
    add_val = np.empty(ncand, np.float64)
    rem_idx = np.empty(ncand, np.int64)
    rem_val = np.empty(ncand, np.float64)
    total = 0
    for r in range(N):
        num = 0.0
        den = 0.0
        for k in range(D):
            num += b[r, k] * P[r, k]
            den += P[r, k] * Mp[r, k]
        if not (num > 0.0 and den > 0.0):
            continue
        for _ in range(max_moves):
            na = 0
            nr = 0
            inv_num = 1.0 / num
            inv_den = 1.0 / den
            for k in range(D):
                grad = b[r, k] * inv_num - Mp[r, k] * inv_den
                xk = x[r, k]
                if xk != 0.0:
                    t = 1.0 if xk > 0.0 else -1.0
                    # first-order gain of adding a pulse at k
                    na = _keep_top(add_val, add_idx, na, ncand, t * grad, k)
                pk = P[r, k]
                if pk != 0:
                    s = 1.0 if pk > 0 else -1.0
                    # first-order gain of removing a pulse at k
                    nr = _keep_top(rem_val, rem_idx, nr, ncand, -s * grad, k)
            best_i = -1
            best_j = -1
            best_num = num
            best_den = den
            for a in range(nr):
                i = rem_idx[a]
                si = 1.0 if P[r, i] > 0 else -1.0
                for c in range(na):
                    j = add_idx[c]
                    if j == i:
                        continue
                    tj = 1.0 if x[r, j] > 0.0 else -1.0
                    n2 = num + tj * b[r, j] - si * b[r, i]
                    if n2 <= 0.0:
                        continue
                    d2 = den + 2.0 * (tj * Mp[r, j] - si * Mp[r, i]) + M[j, j] + M[i, i] - 2.0 * si * tj * M[i, j]
                    if d2 <= 0.0:
                        continue
                    # n2^2 / d2 > best_num^2 / best_den (strictly, relative tolerance)
                    if n2 * n2 * best_den > best_num * best_num * d2 * (1.0 + rel_tol):
                        best_i = i
                        best_j = j
                        best_num = n2
                        best_den = d2
            if best_i < 0:
                break
            si = 1.0 if P[r, best_i] > 0 else -1.0
            tj = 1.0 if x[r, best_j] > 0.0 else -1.0
            P[r, best_i] -= np.int32(si)
            P[r, best_j] += np.int32(tj)
            for k in range(D):
                Mp[r, k] += tj * M[best_j, k] - si * M[best_i, k]
            # recompute num/den exactly-ish to avoid drift
            num = 0.0
            den = 0.0
            for k in range(D):
                num += b[r, k] * P[r, k]
                den += P[r, k] * Mp[r, k]
            total += 1
    return total


_REFINE_REL_TOL = 1e-12


# --------------------------------------------------------------------------- helpers


def _unit_shapes(points: np.ndarray) -> np.ndarray:
    """u = p / ||p||_2 in float64 (exact integer norms, so independent of batching)."""
    p = points.astype(np.float64)
    return p / np.sqrt((p * p).sum(axis=1))[:, None]


def _reconstruct(points: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Group vectors (N, D) float32 = gains (N,) float64 times unit shapes: the one formula
    used both when quantizing and when dequantizing, so the two agree bit for bit."""
    return (_unit_shapes(points) * gains[:, None]).astype(np.float32)


def _row_scale(norms16: np.ndarray) -> np.ndarray:
    """Per-row factor of the Beta gains: the stored float16 row norm (float64); a row
    whose stored norm is 0 (or underflowed) gets 0, so it dequantizes to zeros."""
    return norms16.astype(np.float64)


def gain_tables(meta: dict, tensors: dict, R: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook, row_scale), float64, of a layer with codebook gains ("beta": the Beta
    quantile codebook of (D, G, gain_bits); "empirical": its stored levels; row_scale: the
    stored row norms of the R rows): what the reference decode and every kernel turn indices
    into gains with."""
    D, G = int(meta["group_size"]), int(meta["num_groups"])
    if meta["gain"] == "beta":
        codebook = BetaGainQuantizer(D, G, int(meta["gain_bits"]), meta["reconstruction"]).codebook
    else:
        codebook16 = np.asarray(tensors["gain_codebook"])
        if codebook16.dtype != np.float16 or codebook16.shape != (2 ** int(meta["gain_bits"]),):
            raise QuantizationError(f"gain_codebook must be float16 of {2 ** int(meta['gain_bits'])} levels")
        codebook = codebook16.astype(np.float64)
    norms16 = np.asarray(tensors["row_norms"])
    if norms16.dtype != np.float16 or norms16.shape != (R,):
        raise QuantizationError(f"row_norms must be float16 of shape {(R,)}, got {norms16.dtype} {norms16.shape}")
    return np.asarray(codebook, dtype=np.float64), _row_scale(norms16)


def _codebook_gains(codebook: np.ndarray, indices: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """Gains (float64) of codebook indices: codebook[i] * row norm (row_scale broadcast to indices)."""
    return codebook[indices] * row_scale


def escape_tables(meta: dict, tensors: dict, R: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(positions int64 (R, E), gains float64 (R, E)) of a layer's gain escapes, or None
    without them; an unused slot has position G (= num_groups)."""
    E = int(meta.get("gain_escapes", 0))
    if not E:
        return None
    G = int(meta["num_groups"])
    pos = np.asarray(tensors["escape_groups"])
    gains16 = np.asarray(tensors["escape_gains"])
    if pos.dtype != _escape_position_dtype(G) or pos.shape != (R, E):
        raise QuantizationError(f"escape_groups must be {_escape_position_dtype(G)} of shape {(R, E)}, "
                                f"got {pos.dtype} {pos.shape}")
    if gains16.dtype != np.float16 or gains16.shape != (R, E):
        raise QuantizationError(f"escape_gains must be float16 of shape {(R, E)}, got {gains16.dtype} {gains16.shape}")
    pos = pos.astype(np.int64)
    if (pos > G).any():
        raise QuantizationError(f"escape_groups holds a group beyond num_groups={G}: the payload is damaged")
    return pos, gains16.astype(np.float64)


def apply_escapes(gains: np.ndarray, escapes: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Gains (R, G) with the escaped groups' stored gains put in place (in place; returned)."""
    if escapes is not None:
        pos, values = escapes
        rows, slots = np.nonzero(pos < gains.shape[1])
        gains[rows, pos[rows, slots]] = values[rows, slots]
    return gains


# --------------------------------------------------------------------------- the method


def encode_shapes(points: np.ndarray, K: int, enumeration: str) -> np.ndarray:
    """Codes of pyramid points in the stored enumeration ("split" or "fischer")."""
    return split_encode(points, K) if enumeration == "split" else encode(points, K)


def pack_shapes(points: np.ndarray, K: int, enumeration: str, code_bits: int) -> np.ndarray:
    """The stored ``codes`` array of (N, D) pyramid points: encoded, then bit-packed."""
    return pack_codes(encode_shapes(points, K, enumeration), code_bits)


def decode_shapes(codes: np.ndarray, D: int, K: int, enumeration: str) -> np.ndarray:
    """Pyramid points of unpacked codes in the stored enumeration (CodecError on a bad code)."""
    if enumeration == "split":
        return split_decode(codes, D, K)
    if enumeration == "fischer":
        return decode(codes, D, K)
    raise QuantizationError(f"unknown enumeration {enumeration!r}; this pvq reads {ENUMERATIONS[1:]}")


class _GainTables(NamedTuple):
    """A layer's codebook-gain tables (gain "beta" or "empirical", see the module docstring)."""

    norms16: np.ndarray  # (R,) the stored row norms
    row_scale: np.ndarray  # (R,) float64 factor of a row's gains (0: the row dequantizes to zeros)
    live: np.ndarray  # (R,) rows with row_scale > 0
    codebook: np.ndarray  # float64 normalised gain levels
    codebook16: np.ndarray | None  # the stored levels ("empirical" only)


def _fit_gain_tables(W0: torch.Tensor, config: PVQConfig, G: int) -> _GainTables | None:
    """The codebook-gain tables of the original weights W0 (None for fp16 gains)."""
    if config.gain == "fp16":
        return None
    R, D = W0.shape[0], int(config.group_size)
    norms16 = stored_float16(W0.double().norm(dim=1).numpy(), "row norm")
    row_scale = _row_scale(norms16)
    live = row_scale > 0
    codebook16 = None
    if config.gain == "beta":
        codebook = BetaGainQuantizer(D, G, int(config.gain_bits), config.reconstruction).codebook
    else:
        group_norms = W0.double().reshape(R, G, D).norm(dim=2).numpy()[live] / row_scale[live, None]
        codebook16 = stored_float16(empirical_gain_codebook(group_norms, int(config.gain_bits)), "gain level")
        codebook = codebook16.astype(np.float64)
    return _GainTables(norms16, row_scale, live, codebook, codebook16)


class _GroupSteps:
    """PVQ's step quantizer for `error_feedback`: the group of D columns at processing
    position g, all rows at once: shape (codec search, then `hessian_refine` under the
    block metric), gain (block-optimal with the Hessian, else least squares) quantized to
    the gain format, escapes. Records points, gains and escapes by processing position.

    A: the block inverses ``U_gg^{-1}`` (G, D, D) float64 in processing order, None
    without the Hessian; group_order: the input group at each processing position
    (act-order), None when they agree."""

    def __init__(self, config: PVQConfig, R: int, G: int, tables: _GainTables | None, A: np.ndarray | None,
                 group_order: torch.Tensor | None) -> None:
        self.config, self.tables, self.A, self.group_order = config, tables, A, group_order
        self.D, self.K = int(config.group_size), config.pulses
        self.refine = A is not None and config.hessian_refine and config.refine_max_moves > 0
        self.moves = 0
        E = int(config.gain_escapes)
        self.esc_pos = np.full((R, E), G, dtype=np.int64)
        self.esc_gain = np.zeros((R, E), dtype=np.float16)
        self.esc_used = np.zeros(R, dtype=np.int64)
        self.points = np.empty((R, G, self.D), dtype=np.int32)
        self.gains = np.empty((R, G), dtype=np.float16 if tables is None else np.int64)

    def __call__(self, pending: torch.Tensor, j: int) -> torch.Tensor:
        g = j // self.D
        x = pending[:, : self.D].double().numpy()
        p = search(x, self.K, self.config.search_method)
        s = self._shape_gain(x, p, g)
        self.points[:, g, :] = p
        return torch.from_numpy(_reconstruct(p, self._quantize_gain(s, g)))

    def _shape_gain(self, x: np.ndarray, p: np.ndarray, g: int) -> np.ndarray:
        """The gain of shapes p for vectors x; with the Hessian, p is first refined (in place)
        under the block metric ``A A^T`` and the gain is the block-optimal one."""
        if self.A is None:
            return (x * _unit_shapes(p)).sum(axis=1)
        A = self.A[g]
        if self.refine:
            cfg = self.config
            M = A @ A.T
            M = 0.5 * (M + M.T)
            Mp = p.astype(np.float64) @ M
            self.moves += _refine_rows(
                x, p, x @ M, Mp, M, int(cfg.refine_candidates), int(cfg.refine_max_moves), _REFINE_REL_TOL
            )
        wA = x @ A
        uA = _unit_shapes(p) @ A
        return (wA * uA).sum(axis=1) / (uA * uA).sum(axis=1)

    def _quantize_gain(self, s: np.ndarray, g: int) -> np.ndarray:
        """The gains s (float64) as stored: recorded at position g, returned as reconstructed."""
        t = self.tables
        if t is None:
            g16 = stored_float16(s, "gain")
            self.gains[:, g] = g16
            return g16.astype(np.float64)
        level = s / np.where(t.live, t.row_scale, 1.0)
        idx = nearest_level(level, t.codebook)
        idx[~t.live] = 0
        self.gains[:, g] = idx
        s_hat = _codebook_gains(t.codebook, idx, t.row_scale)
        E = self.esc_pos.shape[1]
        if E:
            # rows beyond the top level with a free slot keep their gain exactly
            rows = np.nonzero(t.live & (level > t.codebook[-1]) & (self.esc_used < E))[0]
            if rows.size:
                exact = stored_float16(s[rows], "gain")
                slots = self.esc_used[rows]
                self.esc_pos[rows, slots] = g if self.group_order is None else int(self.group_order[g])
                self.esc_gain[rows, slots] = exact
                self.esc_used[rows] += 1
                s_hat[rows] = exact.astype(np.float64)
        return s_hat

    def restore_order(self) -> None:
        """Points and gains from processing order back to the stored (input) group order."""
        if self.group_order is not None:
            order = self.group_order.numpy()
            self.points[:, order, :] = self.points.copy()
            self.gains[:, order] = self.gains.copy()


def _check_layer(config: PVQConfig, C: int, G: int, hessian: torch.Tensor | None) -> None:
    """What a layer must satisfy beyond its config, checked before any work."""
    D = int(config.group_size)
    if config.gain == "beta" and G < 2:
        raise QuantizationError(
            f"Beta gains need at least 2 groups per row, got C={C}, D={D} (use gain='fp16' or a smaller D)"
        )
    if config.use_hessian and hessian is None:
        raise QuantizationError("use_hessian=True needs the layer's Hessian; pass one or set use_hessian=False")
    if int(config.gain_escapes) > G:
        raise QuantizationError(f"gain_escapes={int(config.gain_escapes)} exceeds the {G} groups of a row")


def _payload(config: PVQConfig, steps: _GroupSteps) -> dict[str, np.ndarray]:
    """The stored tensors (module docstring) of the recorded points and gains (stored order)."""
    R, G, D = steps.points.shape
    tensors = {"codes": pack_shapes(steps.points.reshape(R * G, D), steps.K, config.code_order, config.code_bits)}
    if steps.tables is None:
        tensors["gains"] = steps.gains
        return tensors
    tensors["gain_indices"] = pack_codes(steps.gains.reshape(-1).astype(np.uint64), int(config.gain_bits))
    tensors["row_norms"] = steps.tables.norms16
    if config.gain == "empirical":
        tensors["gain_codebook"] = steps.tables.codebook16
    if config.gain_escapes:
        order = np.argsort(steps.esc_pos, axis=1, kind="stable")  # slots by stored group, unused last
        tensors["escape_groups"] = np.take_along_axis(steps.esc_pos, order, axis=1).astype(_escape_position_dtype(G))
        tensors["escape_gains"] = np.take_along_axis(steps.esc_gain, order, axis=1)
    return tensors


#: The order of a quantized layer's meta keys (part of the stored bytes): `layout`'s, with
#: what the quantizer adds in between.
_META_ORDER = ("group_size", "num_groups", "pulses", "code_bits", "shape_bits", "gain", "gain_bits", "use_hessian",
               "hessian_refine", "search_method", "percdamp", "code_order", "enumeration", "reconstruction",
               "gain_escapes", "damping", "act_order")


def _meta(config: PVQConfig, shape: tuple[int, int], steps: _GroupSteps, damping: float | None) -> dict:
    """`layout(config, shape)` and how the layer was quantized, in `_META_ORDER`."""
    meta = dict(layout(config, shape), shape_bits=float(config.shape_bits), use_hessian=bool(config.use_hessian),
                hessian_refine=bool(steps.refine), search_method=config.search_method, percdamp=float(config.percdamp))
    if damping is not None:
        meta["damping"] = float(damping)
    if steps.group_order is not None:
        meta["act_order"] = True
    return {key: meta[key] for key in _META_ORDER if key in meta}


def quantize(weight: torch.Tensor, hessian: torch.Tensor | None, config: PVQConfig | None = None) -> QuantizedTensor:
    config = check_config(config, PVQConfig)
    check_weight(weight, hessian)
    R, C = weight.shape
    D = int(config.group_size)
    G = _groups(D, C)
    _check_layer(config, C, G, hessian)
    W0 = as_float32(weight)
    tables = _fit_gain_tables(W0, config, G)

    W, U, A, inv, group_order, col_order = W0.clone(), None, None, None, None, None
    if config.use_hessian:
        if config.act_order:
            # groups (kept whole, so storage is unchanged) in order of decreasing Hessian energy
            group_order, col_order = act_order(hessian, D)
        W, inv = prepare(W0, hessian, config.percdamp, col_order)
        U, A = inv.U, diagonal_block_inverses(inv.U, D)  # A_g = U_gg^{-1}, the block metrics (float64)
    steps = _GroupSteps(config, R, G, tables, None if A is None else A.numpy(), group_order)
    Q = error_feedback(W, steps, lazy_blocks(C, D * max(1, LAZY_BLOCK // D)), U, D,
                       None if A is None else A.float())
    steps.restore_order()

    qt = QuantizedTensor(method="pvq", shape=(R, C), tensors=_payload(config, steps),
                         meta=_meta(config, (R, C), steps, None if inv is None else inv.damping))
    if hessian is not None:
        qt.proxy_loss = proxy_loss(W0, restore_columns(Q, col_order), hessian.detach().to("cpu"))
    qt.extra.update(nominal_bits_per_weight=nominal_bits_per_weight(config), refine_moves=int(steps.moves))
    return qt


def _points(qt: QuantizedTensor) -> np.ndarray:
    """The R*G pyramid points (R*G, D) of the stored codes."""
    R, C = qt.shape
    meta = qt.meta
    D, G, K, nbits = (int(meta[k]) for k in ("group_size", "num_groups", "pulses", "code_bits"))
    if D * G != C:
        raise QuantizationError(f"meta group_size {D} x num_groups {G} does not match in_features {C}")
    return decode_shapes(unpack_codes(qt.tensors["codes"], R * G, nbits), D, K, meta.get("enumeration", "fischer"))


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    R, C = qt.shape
    meta = qt.meta
    G = int(meta["num_groups"])
    try:
        points = _points(qt)
        if meta["gain"] == "fp16":
            gains16 = np.asarray(qt.tensors["gains"])
            if gains16.dtype != np.float16 or gains16.shape != (R, G):
                raise QuantizationError(f"gains must be float16 of shape {(R, G)}, got {gains16.dtype} {gains16.shape}")
            gains = gains16.astype(np.float64).reshape(-1)
        elif meta["gain"] in ("beta", "empirical"):
            codebook, row_scale = gain_tables(meta, qt.tensors, R)
            idx = unpack_codes(qt.tensors["gain_indices"], R * G, int(meta["gain_bits"]))[:, 0].astype(np.int64)
            gains = _codebook_gains(codebook, idx.reshape(R, G), row_scale[:, None])
            gains = apply_escapes(gains, escape_tables(meta, qt.tensors, R)).reshape(-1)
        else:
            raise QuantizationError(f"unknown gain format {meta['gain']!r}")
    except KeyError as e:
        raise QuantizationError(f"stored tensors or meta lack {e.args[0]!r}") from None
    except CodecError as e:
        raise QuantizationError(f"corrupt pvq payload: {e}") from None
    return torch.from_numpy(_reconstruct(points, gains).reshape(R, C))


class _TunablePVQ(TunableWeight):
    """PVQ weight: fp16 gains (R, G) trained directly; Beta gains through the row norms
    (the data-free codebook stays); fitted gains through the row norms and the layer's
    gain levels. The gain indices never change. The pyramid points are held as int8 (a
    quarter of a float copy) and can move one pulse at a time (`code_moves`)."""

    codes_kind = "pyramid points"

    def __init__(self, qt: QuantizedTensor) -> None:
        super().__init__(qt)
        R, C = qt.shape
        meta = qt.meta
        G = int(meta["num_groups"])
        self.gain = meta["gain"]
        try:
            points = _points(qt)
        except CodecError as e:
            raise QuantizationError(f"corrupt pvq payload: {e}") from None
        # |p_i| <= K <= 127 for every pyramid a layout allows (int8); checked, not assumed
        if np.abs(points).max(initial=0) > 127:
            raise QuantizationError("pvq points beyond int8 cannot be fine-tuned")
        self.register_buffer("points", torch.from_numpy(points.astype(np.int8)).reshape(R, G, -1))
        if self.gain == "fp16":
            self.gains = torch.nn.Parameter(torch.from_numpy(np.asarray(qt.tensors["gains"]).astype(np.float32)))
            return
        codebook, row_scale = gain_tables(meta, qt.tensors, R)
        idx = unpack_codes(qt.tensors["gain_indices"], R * G, int(meta["gain_bits"]))[:, 0].astype(np.int64)
        self.register_buffer("indices", torch.from_numpy(idx.reshape(R, G)))
        self.row_norms = torch.nn.Parameter(torch.from_numpy(row_scale.astype(np.float32)))
        levels = torch.from_numpy(codebook.astype(np.float32))
        if self.gain == "empirical":
            self.gain_codebook = torch.nn.Parameter(levels)
        else:
            self.register_buffer("beta_codebook", levels)
        escapes = escape_tables(meta, qt.tensors, R)
        self.escaped = escapes is not None
        if self.escaped:
            pos, values = escapes
            rows, slots = np.nonzero(pos < G)
            self.register_buffer("escape_rows", torch.from_numpy(rows))
            self.register_buffer("escape_slots", torch.from_numpy(slots))
            self.register_buffer("escape_groups", torch.from_numpy(pos[rows, slots]))
            self.escape_gains = torch.nn.Parameter(torch.from_numpy(values.astype(np.float32)))

    def _gains(self) -> torch.Tensor:
        if self.gain == "fp16":
            return self.gains
        levels = self.gain_codebook if self.gain == "empirical" else self.beta_codebook
        gains = lookup(levels, self.indices) * self.row_norms[:, None]
        if self.escaped:
            gains = gains.index_put((self.escape_rows, self.escape_groups),
                                    self.escape_gains[self.escape_rows, self.escape_slots])
        return gains

    def _units(self, points: torch.Tensor) -> torch.Tensor:
        p = points.to(torch.float32)
        return p * torch.rsqrt((p * p).sum(dim=-1, keepdim=True).clamp_min(1.0))

    def build(self) -> torch.Tensor:
        return (self._units(self.points) * self._gains()[:, :, None]).reshape(self.qt.shape)

    def code_groups(self) -> torch.Tensor:
        return self.points.view(-1, self.points.shape[-1])

    def code_moves(self, grad: torch.Tensor, curvature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For every group the best single-pulse move (a pulse taken from one coordinate and
        given to another, so still a point of P(D, K)) with the gain held. Each coordinate
        is scored on its own by the quadratic model with the step u = gain / |p|_2 (the
        coordinate to take from: the cheapest non-zero one to shrink; the one to give to:
        the cheapest other one to grow, a zero one in the sign the gradient asks); the
        move's predicted change is then that of the exact renormalised point. Returns
        (predicted change (N,), +inf where it is not negative; moved points (N, D) int8)."""
        with torch.no_grad():
            p = self.points.to(torch.float32)
            R, G, D = p.shape
            g = grad.to(torch.float32).reshape(R, G, D)
            F = curvature.reshape(R, G, D)
            gains = self._gains().detach()[:, :, None]
            u = gains * torch.rsqrt((p * p).sum(dim=-1, keepdim=True).clamp_min(1.0))
            sign = torch.sign(p)
            quad = 0.5 * F * u * u
            take_cost = torch.where(p != 0, -sign * g * u + quad, torch.tensor(torch.inf))
            i = take_cost.argmin(dim=-1, keepdim=True)
            give_sign = torch.where(p != 0, sign, -torch.sign(g))
            give_sign = torch.where(give_sign == 0, torch.ones_like(give_sign), give_sign)
            give_cost = give_sign * g * u + quad
            give_cost.scatter_(-1, i, torch.inf)
            j = give_cost.argmin(dim=-1, keepdim=True)
            moved = p.clone()
            moved.scatter_add_(-1, i, -sign.gather(-1, i))
            moved.scatter_add_(-1, j, give_sign.gather(-1, j))
            change = gains * (self._units(moved) - self._units(p))
            delta = predicted_change(g, F, change)
            delta = torch.where(delta < 0, delta, torch.tensor(torch.inf))
            return delta.reshape(-1), moved.to(torch.int8).reshape(R * G, D)

    def trained(self) -> dict[str, np.ndarray]:
        out = {}
        if self.codes_changed:
            meta = self.qt.meta
            points = self.code_groups().cpu().numpy().astype(np.int64)
            out["codes"] = pack_shapes(points, int(meta["pulses"]), meta.get("enumeration", "fischer"),
                                       int(meta["code_bits"]))
        if self.gain == "fp16":
            return {**out, "gains": stored_float16(self.gains, "gain")}
        out["row_norms"] = stored_float16(self.row_norms, "row norm")
        if self.gain == "empirical":
            out["gain_codebook"] = stored_float16(self.gain_codebook, "gain level")
        if self.escaped:
            used = torch.zeros_like(self.escape_gains, dtype=torch.bool)
            used[self.escape_rows, self.escape_slots] = True
            out["escape_gains"] = stored_float16(torch.where(used, self.escape_gains, 0.0), "escaped gain")
        return out


def tunable(qt: QuantizedTensor) -> TunableWeight:
    """The layer's weight as a function of its gains (see `_TunablePVQ`)."""
    return _TunablePVQ(qt)


#: Shape bits the bit allocation chooses from (`rate_ladder`), besides the config's own.
LADDER_SHAPE_BITS = tuple(x / 8 for x in range(8, 41, 2))  # 1.0, 1.25, ..., 5.0


def rate_ladder(config: PVQConfig) -> list[PVQConfig]:
    """The settings a per-layer bit allocation chooses from: `config` with each shape
    bits of LADDER_SHAPE_BITS (and its own) that buys a pyramid, in increasing order."""
    import dataclasses

    out = {}
    for bits in sorted({*LADDER_SHAPE_BITS, float(config.shape_bits)}):
        try:
            out[bits] = dataclasses.replace(config, shape_bits=bits)
        except QuantizationError:
            continue
    return list(out.values())
