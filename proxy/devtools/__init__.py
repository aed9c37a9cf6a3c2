"""Development and test helpers (not used by the serving path)."""
