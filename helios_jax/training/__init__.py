"""Training: offloaded data (``data``, ``offload``), sample assembly and anti-drifting (``history``), losses."""


class DataError(ValueError):
    """Training data that cannot be used as given (a missing folder, a bad file or entry, no usable clip)."""
