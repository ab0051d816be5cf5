"""Layer 5, worker side: the DEALER-socket loop (registration, rounds); the rest is in ``runtime``."""
