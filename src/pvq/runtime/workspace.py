"""The one reusable weight buffer of all kernels (per device and dtype): a decoded weight
that must change dtype or device, or a row chunk being decoded, lands here instead of in a
fresh allocation, so a model holds at most one decoded layer per (device, dtype)."""

from __future__ import annotations

import torch


class _Workspace:
    """One reusable weight buffer per (device, dtype), grown to the largest layer seen:
    a decoded weight that must change dtype or device lands here instead of in a fresh
    allocation, so a model holds at most one decoded layer per (device, dtype)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (str(device), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def device_buffer(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least `numel` elements on `device` (reused)."""
        return self._buffer(numel, torch.float32, device)

    def weight_like(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`weight` in x's dtype and device: itself when it already is, else a copy into the
        reused buffer of that (device, dtype)."""
        if weight.dtype == x.dtype and weight.device == x.device:
            return weight
        out = self._buffer(weight.numel(), x.dtype, x.device).view(weight.shape)
        out.copy_(weight)
        return out


WORKSPACE = _Workspace()
