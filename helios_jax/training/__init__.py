"""Training: offloaded data (``data``, ``offload``), sample assembly and anti-drifting (``history``), losses."""
