"""Pure-math PVQ codec (numpy/numba, no torch)."""
