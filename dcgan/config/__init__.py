"""A run's settings: the typed sections, loading YAML and overrides, and the keys' help."""
