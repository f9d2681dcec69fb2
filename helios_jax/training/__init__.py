"""Training: offloaded data (``data``, ``offload``), sample assembly and anti-drifting (``history``), losses,
the generic step and loop (``trainer``) and the official YAMLs mapped onto it (``recipes``); the stage-3 GAN heads and losses (``discriminator``) and
DMD, the backward-simulated rollout and the update schedule (``distill``), the EMA of the trainables (``ema``); stage 3a's ODE pairs, their
dataset and the ODE-regression loss (``ode``)."""


class DataError(ValueError):
    """Training data that cannot be used as given (a missing folder, a bad file or entry, no usable clip)."""
