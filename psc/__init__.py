"""Layer 6: the ``psc`` command line (click)."""
