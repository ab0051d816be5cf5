"""Layer 5, worker side: the DEALER-socket worker process (device placement, gradient oracle)."""
