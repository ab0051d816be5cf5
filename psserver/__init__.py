"""Layer 5, server side: the ROUTER-socket server process (membership, rounds, metrics)."""
