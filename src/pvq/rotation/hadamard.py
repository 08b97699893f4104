"""Hadamard matrices, the fast Walsh-Hadamard transform and seeded randomized rotations.

Pure math on torch tensors (numpy for the finite-field tables); nothing here knows about
models.

Hadamard matrices (``H H^T = K I``, entries +-1) are built for these orders K:

- K = 1, 2 and every power of two (Sylvester: H_{2K} = [[H_K, H_K], [H_K, -H_K]]);
- K = q + 1 for every prime power q = 3 (mod 4)  (Paley construction I);
- K = 2 (q + 1) for every prime power q = 1 (mod 4)  (Paley construction II);
  prime powers p^k with k > 1 use GF(p^k) built from an irreducible polynomial
  (e.g. 28 = 27 + 1 = 3^3 + 1, 344 = 7^3 + 1), up to ``MAX_PALEY_ORDER``;
- K = 2 K' for every such K' (one Sylvester doubling step, e.g. 40 = 2 * 20).

Multiples of 4 up to 400 with no construction here: 92, 116, 156, 172, 184, 188, 232,
236, 260, 268, 292, 324, 356, 372, 376 (Hadamard matrices of these orders exist, from other
constructions this module does not implement).

A size n is factored as n = K * 2^m with H_n = kron(H_K, H_{2^m}), the smallest
constructible K of the candidates K = b * 2^j (b the odd part of n, 0 <= j <= the power
of two in n). So 576 = 36 * 16 (Paley II, q = 17), 1536 = 12 * 128 (Paley I, q = 11),
11008 = 344 * 32 (Paley I, q = 343 = 7^3), 14336 = 28 * 512 (Paley I, q = 27 = 3^3),
5120 = 20 * 256, 13824 = 108 * 128, 18944 = 148 * 128, 8960 = 140 * 64; every power of
two is pure Sylvester (K = 1). `hadamard_order_table` lists the orders up to a bound.

Where no candidate K has a construction here (e.g. n = 172 = 43 * 4, or an odd n > 1),
the K-factor is instead a seeded random orthogonal matrix (QR of a Gaussian
matrix drawn from the seed, signs fixed), with a `RotationWarning`; the rotation is then
still orthogonal, only not a Hadamard one.

A randomized Hadamard rotation is R = diag(s) H_n / sqrt(n) with random signs s; it is
orthogonal, and x -> x R costs O(n log n) through the fast transform on the 2^m part
and a small K x K product. Its signs are derived from SHA-256 of (seed, label, counter),
so they are the same on every platform and every version of torch / numpy; each
rotation has a `digest` (sha256 of its signs and its K-factor) that a stored record is
checked against when it is rebuilt.
"""

from __future__ import annotations

from pvq.errors import PVQError

import functools
import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "MAX_PALEY_ORDER",
    "RandomizedHadamard",
    "RotationError",
    "RotationWarning",
    "fwht",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_order_construction",
    "hadamard_order_table",
    "hadamard_transform",
    "random_orthogonal",
    "random_signs",
]

MAX_PALEY_ORDER = 4096  # largest K built by a Paley construction (a dense K x K table)


class RotationError(PVQError, ValueError):
    """A rotation that cannot be built or rebuilt (bad size, seed, record, or model layout)."""


class RotationWarning(UserWarning):
    """A size with no Hadamard construction here: a seeded random orthogonal factor is used."""


# =========================================================================== finite fields


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k >= 1; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials as coefficient lists, lowest degree first, f monic."""
    a = [c % p for c in a]
    df = len(f) - 1
    while len(a) - 1 >= df and any(a):
        if a[-1] == 0:
            a.pop()
            continue
        c, shift = a[-1], len(a) - 1 - df
        for i, fc in enumerate(f):
            a[shift + i] = (a[shift + i] - c * fc) % p
        a.pop()
    return a + [0] * (df - len(a)) if len(a) < df else a[:df]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (lexicographic search)."""

    def monic(deg: int):
        for idx in range(p**deg):
            coeffs = [(idx // p**i) % p for i in range(deg)]
            yield coeffs + [1]

    for f in monic(k):
        if f[0] == 0:
            continue  # divisible by x
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in monic(d)):
            return f
    raise RotationError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


@functools.lru_cache(maxsize=64)
def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(chi, digits): chi[a] in {0, 1, -1} the quadratic character of element a of GF(q),
    elements numbered by their base-p digits (coefficients of the polynomial basis);
    digits (q, k) those digits, so that a - b is digit-wise subtraction mod p."""
    pk = _prime_power(q)
    if pk is None:
        raise RotationError(f"{q} is not a prime power")
    p, k = pk
    digits = np.array([[(a // p**i) % p for i in range(k)] for a in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)
    if k == 1:
        squares = (np.arange(q, dtype=np.int64) ** 2) % q
    else:
        f = _irreducible(p, k)
        squares = np.empty(q, dtype=np.int64)
        for a in range(q):
            da = list(digits[a])
            prod = [0] * (2 * k - 1)
            for i, x in enumerate(da):
                if x:
                    for j, y in enumerate(da):
                        prod[i + j] += x * y
            squares[a] = int(np.dot(_poly_mod(prod, f, p), weights))
    chi = -np.ones(q, dtype=np.int64)
    chi[squares] = 1
    chi[0] = 0
    return chi, digits


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q)."""
    chi, digits = _quadratic_character(q)
    p, k = _prime_power(q)
    weights = p ** np.arange(k, dtype=np.int64)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ weights]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q = 3 (mod 4): H = I + [[0, j^T], [-j, Q]]."""
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1), q = 1 (mod 4): the symmetric conference matrix C = [[0, j^T], [j, Q]],
    H = C x [[1, -1], [-1, -1]] + I x [[1, 1], [1, -1]]."""
    Q = _jacobsthal(q)
    n = q + 1
    C = np.zeros((n, n), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    return np.kron(C, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(n, dtype=np.int64), np.array([[1, 1], [1, -1]]))


def _sylvester(n: int) -> np.ndarray:
    H = np.ones((1, 1), dtype=np.int64)
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def hadamard_order_construction(K: int) -> str | None:
    """How a Hadamard matrix of order K is built here ("sylvester", "paley1(q=..)",
    "paley2(q=..)"), or None where this module has no construction for K."""
    if K < 1:
        return None
    if K & (K - 1) == 0:
        return "sylvester"
    if K % 4 or K > MAX_PALEY_ORDER:
        return None
    q = K - 1
    if q % 4 == 3 and _prime_power(q):
        return f"paley1(q={q})"
    q = K // 2 - 1
    if q % 4 == 1 and _prime_power(q):
        return f"paley2(q={q})"
    if K % 8 == 0 and (half := hadamard_order_construction(K // 2)) is not None:
        return f"2x{half}"
    return None


@functools.lru_cache(maxsize=32)
def _hadamard_np(K: int) -> np.ndarray:
    how = hadamard_order_construction(K)
    if how is None:
        raise RotationError(f"no Hadamard construction for order {K} (see hadamard_order_table)")
    if how == "sylvester":
        H = _sylvester(K)
    elif how.startswith("2x"):
        half = _hadamard_np(K // 2)
        H = np.block([[half, half], [half, -half]])
    elif how.startswith("paley1"):
        H = _paley1(K - 1)
    else:
        H = _paley2(K // 2 - 1)
    H.setflags(write=False)
    return H


def hadamard_order_table(limit: int = 512) -> dict[int, str]:
    """{order K: construction} for every K <= limit with a construction here."""
    return {K: how for K in range(1, limit + 1) if (how := hadamard_order_construction(K))}


def hadamard_factor(n: int) -> tuple[int, int, str | None]:
    """(K, 2^m, construction of K) with n = K * 2^m and the smallest constructible K;
    where none is constructible, (odd part of n, 2^a, None)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise RotationError(f"rotation size must be a positive integer, got {n!r}")
    n = int(n)
    a = (n & -n).bit_length() - 1
    b = n >> a
    for j in range(a + 1):
        K = b << j
        how = hadamard_order_construction(K)
        if how is not None:
            return K, n // K, how
    return b, 1 << a, None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (unnormalised, +-1) Hadamard matrix H_n = kron(H_K, H_{2^m}); RotationError if
    this module has no construction for n."""
    K, M, how = hadamard_factor(n)
    if how is None:
        raise RotationError(f"no Hadamard matrix of order {n} here: no order K = {K} * 2^j with a construction divides it")
    return torch.from_numpy(np.kron(_hadamard_np(K), _sylvester(M)).astype(np.float64)).to(dtype)


# =========================================================================== transforms


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dimension (a power of
    two): x @ H (Sylvester order), O(n log n), batched over the leading dimensions."""
    n = x.shape[-1]
    if n & (n - 1):
        raise RotationError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor, K_matrix: torch.Tensor | None = None) -> torch.Tensor:
    """x @ kron(A, H_{2^m}) over the last dimension n = K * 2^m, for a K x K matrix A
    (None: K = 1): the fast transform on the 2^m part and a K x K product."""
    n = x.shape[-1]
    K = 1 if K_matrix is None else K_matrix.shape[0]
    if n % K:
        raise RotationError(f"last dimension {n} is not a multiple of the K-factor {K}")
    M = n // K
    y = fwht(x.reshape(*x.shape[:-1], K, M))
    if K_matrix is not None:
        y = torch.matmul(K_matrix.to(y.dtype).T, y)  # A^T Y: (K, K) @ (..., K, M)
    return y.reshape(x.shape)


# =========================================================================== seeded randomness


def _stream(seed: int, label: str, nbytes: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"pvq.rotation/{int(seed)}/{label}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:nbytes])


def random_signs(n: int, seed: int, label: str) -> torch.Tensor:
    """n signs +-1 (float64) from SHA-256 of (seed, label, counter): the same everywhere."""
    bits = np.unpackbits(np.frombuffer(_stream(seed, label, (n + 7) // 8), dtype=np.uint8), bitorder="little")[:n]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


def random_orthogonal(n: int, seed: int, label: str) -> torch.Tensor:
    """A seeded random orthogonal n x n matrix (float64): QR of a Gaussian matrix drawn
    with numpy's PCG64 from a seed derived from (seed, label), R's diagonal made positive."""
    derived = int.from_bytes(_stream(seed, f"{label}/orthogonal", 16), "little")
    G = np.random.Generator(np.random.PCG64(derived)).standard_normal((n, n))
    Qm, R = np.linalg.qr(G)
    Qm = Qm * np.where(np.diag(R) < 0, -1.0, 1.0)[None, :]
    return torch.from_numpy(np.ascontiguousarray(Qm))


@dataclass(frozen=True)
class RandomizedHadamard:
    """R = diag(s) kron(A, H_{2^m}) / sqrt(n): orthogonal, n = K * 2^m.

    A is H_K (a +-1 Hadamard matrix) where one is constructed, else a seeded random
    orthogonal K x K matrix scaled by sqrt(K) (with a RotationWarning). `signs` s come
    from (seed, label); `digest` identifies the rotation (signs and A)."""

    n: int
    seed: int
    label: str
    K: int
    construction: str  # "sylvester", "paley1(q=..)", "paley2(q=..)" or "random-orthogonal"
    signs: torch.Tensor  # (n,) float64, +-1
    K_matrix: torch.Tensor | None  # (K, K) float64, None for K = 1

    @classmethod
    def build(cls, n: int, seed: int, label: str, *, warn: bool = True) -> RandomizedHadamard:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise RotationError(f"rotation seed must be a non-negative integer, got {seed!r}")
        K, _, how = hadamard_factor(n)
        if how is None:
            if warn:
                warnings.warn(
                    f"no Hadamard matrix of order {n} is constructed here (factor {K} has none); "
                    f"rotation {label!r} uses a seeded random orthogonal {K}x{K} factor instead",
                    RotationWarning,
                    stacklevel=2,
                )
            A = random_orthogonal(K, int(seed), label) * math.sqrt(K)
            how = "random-orthogonal"
        else:
            A = torch.from_numpy(_hadamard_np(K).astype(np.float64)) if K > 1 else None
        return cls(int(n), int(seed), str(label), K, how, random_signs(n, int(seed), label), A)

    @property
    def digest(self) -> str:
        h = hashlib.sha256(f"{self.n}/{self.K}/{self.construction}/".encode())
        h.update((self.signs < 0).numpy().astype(np.uint8).tobytes())
        if self.K_matrix is not None:
            # rounded, so that a last-bit difference of a platform's QR does not matter
            h.update(np.round(self.K_matrix.numpy(), 6).astype(np.float64).tobytes())
        return h.hexdigest()

    def record(self) -> dict:
        """What rebuilds it: {n, seed, label, K, construction, digest}."""
        return {"n": self.n, "seed": self.seed, "label": self.label, "K": self.K,
                "construction": self.construction, "digest": self.digest}

    @classmethod
    def from_record(cls, record: dict) -> RandomizedHadamard:
        """Rebuild from `record()`; RotationError if the record is malformed or the rebuilt
        rotation differs from the recorded one (size, construction or digest)."""
        if not isinstance(record, dict):
            raise RotationError(f"rotation record is a {type(record).__name__}, not an object")
        missing = [k for k in ("n", "seed", "label", "K", "construction", "digest") if k not in record]
        if missing:
            raise RotationError(f"rotation record {record.get('label')!r} lacks {', '.join(missing)}")
        n, seed, label = record["n"], record["seed"], record["label"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RotationError(f"rotation {label!r}: size {n!r} is not a positive integer")
        if not isinstance(label, str):
            raise RotationError(f"rotation label {label!r} is not a string")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RotationWarning)  # warned when it was made
            rot = cls.build(n, seed, label)
        for field in ("K", "construction", "digest"):
            if record[field] != getattr(rot, field):
                raise RotationError(
                    f"rotation {label!r} (n={n}, seed={seed}) cannot be rebuilt: recorded {field} "
                    f"{record[field]!r}, rebuilt {getattr(rot, field)!r} (corrupted record or a different pvq)"
                )
        return rot

    # -- as a matrix / as a transform ------------------------------------------------------
    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense orthogonal n x n matrix R (rows scaled by the signs)."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R over the last dimension (computed in x's dtype)."""
        if x.shape[-1] != self.n:
            raise RotationError(f"rotation {self.label!r} is of size {self.n}, input has last dimension {x.shape[-1]}")
        s = self.signs.to(device=x.device, dtype=x.dtype)
        K_matrix = None if self.K_matrix is None else self.K_matrix.to(device=x.device, dtype=x.dtype)
        return hadamard_transform(x * s, K_matrix) / math.sqrt(self.n)
