"""Shared lower layers of the parameter server: compressors, wire format, algorithm rules, problems.

Layers (see the README): ``common.compressors`` knows tensors only; nothing here imports the runtime
(``runtime``, ``psserver``, ``worker``) or the command line (``psc``).
"""
