"""The configuration: the typed schema of every Hydra group, its defaults and validation."""
