"""Rotations that leave a model's function unchanged and make its weights incoherent.

- `hadamard`: Hadamard matrices (Sylvester, Paley I/II, doubling), the fast
  Walsh-Hadamard transform, seeded randomized Hadamard rotations (pure math, torch);
- `fused`: the fused rotation of a Llama-family model (`rotate_model`), its JSON record
  and its rebuild on a freshly built model (`install_rotation`, used by checkpoints).

Layering: codec -> methods -> models -> rotation -> calibrate -> runtime -> checkpoint -> eval / cli.
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
from . import hadamard
from .hadamard import *  # noqa: F403 - the pure math, all of it (its __all__)

__all__ = sorted([*hadamard.__all__, "ONLINE_ATTRIBUTE", "RECORD_KIND", "OnlineHadamard", "RotationLayout", "install_rotation", "refresh_online_transforms", "rotate_model", "rotation_layout_for", "rotation_of"])
