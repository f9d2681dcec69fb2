"""Helpers for running the PyTorch reference beside our code in tests.

Only tests import torch; these helpers keep the comparisons and the random weights uniform.
"""

from __future__ import annotations

import numpy as np
import torch


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Fill every parameter and float buffer with seeded normal noise, so that no weight keeps its
    init value (ones, zeros) and a swapped or transposed key cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale)
    return module.eval()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def rel_err(out, ref) -> float:
    """Relative L2 error |out - ref| / |ref|, in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def max_abs(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))))
