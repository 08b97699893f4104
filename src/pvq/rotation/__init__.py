"""Rotations that leave a model's function unchanged and make its weights incoherent.

- `hadamard`: Hadamard matrices (Sylvester, Paley I/II, doubling), the fast
  Walsh-Hadamard transform, seeded randomized Hadamard rotations (pure math, torch);
- `fused`: the fused rotation of a Llama-family model (`rotate_model`), its JSON record
  and its rebuild on a freshly built model (`install_rotation`, used by checkpoints).

Layering: codec -> quant -> models -> rotation -> pipeline -> formats -> eval / cli.
"""

from .fused import (
    ONLINE_ATTRIBUTE,
    RECORD_KIND,
    OnlineHadamard,
    RotationLayout,
    install_rotation,
    refresh_online_transforms,
    rotate_model,
    rotation_layout_for,
    rotation_of,
)
from .hadamard import (
    MAX_PALEY_ORDER,
    RandomizedHadamard,
    RotationError,
    RotationWarning,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_order_construction,
    hadamard_order_table,
    hadamard_transform,
    random_orthogonal,
    random_signs,
)

__all__ = [
    "MAX_PALEY_ORDER",
    "ONLINE_ATTRIBUTE",
    "RECORD_KIND",
    "OnlineHadamard",
    "RandomizedHadamard",
    "RotationError",
    "RotationLayout",
    "RotationWarning",
    "fwht",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_order_construction",
    "hadamard_order_table",
    "hadamard_transform",
    "install_rotation",
    "random_orthogonal",
    "random_signs",
    "refresh_online_transforms",
    "rotate_model",
    "rotation_layout_for",
    "rotation_of",
]
