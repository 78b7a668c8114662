"""Runtime: the Runner protocol and its engines (local, remote), generation, stop strings and caches."""
