"""Where the experiments keep what they write: the checkout's root, RESULTS.md, the GPU targets."""

from __future__ import annotations

import os

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXPERIMENTS)
RESULTS = os.path.join(EXPERIMENTS, "RESULTS.md")
TARGETS = os.path.join(EXPERIMENTS, "targets")  # the H100's target config and autotune results
