"""The nano Helios: a synthetic video world, its metrics, the tiny configs and the recipe that trains the whole stack on it (`make nano`)."""
