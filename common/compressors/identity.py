"""Identity: the uncompressed vector (in every class with omega = 0, alpha = 1; spec Table 3 remark)."""
from __future__ import annotations

from common.compressors import cpu_kernels
from common.compressors.base import Compressor, Constants, register
from common.compressors.payloads import Dense


@register
class Identity(Compressor):
    name = "identity"
    summary = "no compression: the vector itself (32 bits a coordinate in float32)"
    example = "identity"

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        self._set_constants(Constants(unbiased=True, omega=0.0, alpha=1.0, b1=(1.0, 1.0), b2=(1.0, 1.0), theta=0.0))

    def compress(self, x, worker=0, step=0):
        """x checked (``_check_input``) and copied: the copy holds the bits just seen finite, so it
        is marked so (``cpu_kernels.note_finite``) and the encoder does not read it again (at d = 1e7
        a pass of 1.2 ms of a compress + encode of 4.4-6 ms)."""
        payload = super().compress(x, worker, step)
        cpu_kernels.note_finite(payload.values)
        return payload

    def _compress(self, x, key):
        return Dense(x.detach().clone(), x.dtype)  # (the caller keeps x and may change it)

    def _compress_difference(self, target, h, key):
        """target - h as it is: a vector no one else holds, so the copy that ``_compress`` makes of
        its input is not needed (EF21's identity downlink, the default, sends g - g~ every round).
        Long CPU vectors of one dtype take the compiled step x - 1 g (``cpu_kernels.descend``: the
        bits of target - h, since 1 g is g), which marks a finite result as it writes it, so that
        neither the check below nor the encoder's reads it again. Checked as ``compress`` checks x."""
        difference = cpu_kernels.descend(target, 1.0, h)
        if difference is None:
            difference = target - h
        self._check_finite(difference)
        return Dense(difference, difference.dtype)
