"""Training: the generic step and loop (trainer), the official YAMLs mapped onto it (recipes)."""
