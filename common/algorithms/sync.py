"""The sync probability of the MARINA family: p = 1/(omega + 1). Defines no Algorithm.

MARINA (Gorbunov et al. 2021) sends a full gradient with probability p and compressed differences
otherwise; MARINA-P (Gruntkowska, Tyurin, Richtarik 2024, Alg. 1) sends x^{t+1} with probability p
and compressed model differences otherwise; M3 (Alg. 2) has one such coin for each direction. The
papers' default for an unbiased compressor in U(omega) is p = 1/(omega + 1) (MARINA-P Thm D.2 and
Cor. E.2; for Rand-K and Perm-K with K = d/n, p = K/d = 1/n), the cost of a sync round then
matching the expected cost of a compressed one.
"""
from __future__ import annotations


def unbiased_omega(compressor, spec: str, who: str, hint: str = "") -> float:
    """omega of an unbiased compressor; a ValueError (``who``: what needs it) when it has none."""
    omega = compressor.constants["omega"]
    if omega is None:
        raise ValueError(f"{who}: {spec!r} is not unbiased; the method needs an unbiased compressor{hint}")
    return omega


def sync_probability(given: float | None, compressor, spec: str, who: str, option: str = "p") -> float:
    """p: the ``option`` the user gave, else 1/(omega + 1) of ``compressor``."""
    if given is not None:
        return given
    omega = unbiased_omega(compressor, spec, who, f" (or give {option}=)")
    return 1.0 / (omega + 1.0)
