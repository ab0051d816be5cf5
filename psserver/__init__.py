"""Layer 5, server side: the ROUTER-socket loop (membership, rounds); the rest is in ``runtime``."""
