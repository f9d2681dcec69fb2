"""Training: offloaded data (``data``, ``offload``), sample assembly and anti-drifting (``samples``), the
objectives (``losses``), the generic step and loop with its step-program protocol (``trainer``), the
two-player loop (``duel``), the EMA (``ema``), the official YAMLs read and typed (``recipes``); stage 3's
pieces: DMD, the rollout and the update schedule (``distill``), the GAN heads (``discriminator``), the ODE
pairs, their dataset and the ODE-regression loss (``ode``). ``stages`` builds a run of each official stage
from a recipe, with the pieces every stage shares (``parts``)."""


class DataError(ValueError):
    """Training data that cannot be used as given (a missing folder, a bad file or entry, no usable clip)."""


class NonFiniteError(RuntimeError):
    """A training step gave a non-finite loss or gradient norm: raised before any checkpoint of it is
    written, since training on would only save NaN weights."""
