"""Studies: one question each (how long the DiT compiles, how much memory conversion takes), answered on a CPU."""
