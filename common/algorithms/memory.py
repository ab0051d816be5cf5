"""Error-feedback memory and the Markov shift: the two ways a rule keeps what compression dropped.
Defines no Algorithm.

Error feedback, or memory (Stich, Cordonnier, Jaggi 2018; Beznosikov et al. 2023 eqs. 21-22;
Double-Squeeze; 1-bit Adam; COMP-AMS). The vector v handed over already holds the old memory
(v = e + gamma g, or g + delta); what is sent is C(v) and the memory keeps the rest:

    send C(v);   e <- v - C(v)                                   ``error_feedback``

Markov compression (EF21, Richtarik, Sokolov, Fatkhullin 2021; CD-Adam Alg. 1 lines 5-6, 8-10, 12;
EF21-P). Both sides hold the same state h; the sender compresses the distance to its target and
both shift h by what was sent:

    c = C(target - h);   h <- h + c                              ``markov_compress`` (sender)
    h <- h + c                                                   ``shift`` (receiver; or the server's
                                                                  h <- h + (1/n) sum_i c_i)

Every update uses what the receiver decodes (``payload.to_dense()``), never the sender's unrounded
vector, so the copies on both sides stay bit-identical. These are the operations the rules wrote
inline, in the same order: trajectories do not change.
"""
from __future__ import annotations

import torch

from common.algorithms import row_order
from common.algorithms.base import RUNNING_SUM_ROWS, dense, last_columns, mean_of, support_step
from common.compressors import cpu_kernels, indices as index_sets
from common.compressors.payloads import Signs, Sparse, add_dense


def error_feedback(compressor, v: torch.Tensor, worker: int, step: int, owned: bool = False):
    """Send C(v), keep the rest: returns (payload, e) with e = v - C(v) (C(v) as decoded). With
    ``owned`` (v is a vector the caller has just made and holds alone), where C(v) is sparse with its
    indices sent (Top-K), e is v itself with C(v) taken off on the support alone, in one compiled
    loop (``base.support_step`` with a step of 1, ``cpu_kernels.add_on_support``): O(k) instead of two
    passes over d (the dense form and the difference), the same bits, since v - 1 * c is v - c."""
    c = compressor.compress(v, worker=worker, step=step)
    taken = support_step(v, 1.0, c) if owned else None
    if taken is not None and cpu_kernels.add_on_support(v, *taken) is not None:
        return c, v
    return c, v - dense(c)


def markov_message(compressor, target: torch.Tensor, h: torch.Tensor, worker: int, step: int):
    """The message of the sender's Markov step, c = C(target - h); the state moves by ``shift(h, c)``
    (a worker does that after sending, in its rule's ``settle``)."""
    return compressor.compress_difference(target, h, worker=worker, step=step)


def markov_compress(compressor, target: torch.Tensor, h: torch.Tensor, worker: int, step: int, owned: bool = False):
    """The sender's Markov step: returns (c, h + c) with c = C(target - h) (``owned``: see ``shift``)."""
    c = markov_message(compressor, target, h, worker, step)
    return c, shift(h, c, owned)


def shift_by_mean(h: torch.Tensor, uplinks, name: str, owned: bool = False) -> torch.Tensor:
    """h + (1/n) sum_i c_i for the payloads ``name`` of the uplinks (the server's Markov state of
    EF21 and CD-Adam): ``shift(h, mean_of(uplinks, name), owned)``, bit for bit. Where every c_i is a
    scaled sign of h's dtype and length (2 to 14 of them, on the CPU, long; from 5 on added in
    ATen's order, ``row_order``), one compiled pass reads the
    flags and h and writes the new state (``cpu_kernels.signs_mean_added``), without the dense
    forms, the sum or the mean as vectors; where every c_i is sparse with its indices sent (Top-K) or
    drawn from its key (Rand-K: the ascending support that the key gives), h + 0 and the mean on the
    union of the supports (``cpu_kernels.sparse_mean_added``), and with ``owned`` (h is the caller's
    own state, as in ``shift``) where h holds no negative zero, the union of the supports alone,
    written into h: O(n k) instead of a pass over d (EF21's server at d = 1e7, two Top-1% uplinks).
    For 2 to 4 uplinks whose supports all come as bitmaps (long Rand-K: M3's uplink), the same sums
    in one pass over h that reads the bitmaps (``cpu_kernels.marked_mean_added``), into h where
    the caller owns it.
    The result is marked as free of negative zeros where it is (``cpu_kernels.without_negative_zero``:
    off the supports h_i + 0 never is; on them only h_i = -0 can give one, which an unmarked h's
    result is read for, O(n k)), so that the next round's shift takes that way. Perm-K's blocks keep the dense mean, whose forms come
    from their bitmaps. Since h + c and c + h are the same sum, the rules that add a mean to a vector
    (MARINA's and M3's g, the error-feedback servers' delta) shift by it here too."""
    payloads = [m.payloads[name] for m in uplinks]
    few = 1 < len(payloads) <= RUNNING_SUM_ROWS.get(h.dtype, 0)
    ordered = len(payloads) in cpu_kernels.ORDERED_MEAN_ROWS  # 5 to 14: ATen's order in the last columns
    cut = row_order.first_interleaved([h] * len(payloads)) if ordered else None
    if not (few or cut is not None):
        return shift(h, mean_of(uplinks, name), owned)
    fused = None
    if all(isinstance(p, Signs) and p.dtype == h.dtype for p in payloads):
        fused = cpu_kernels.signs_mean_added(h, [p.negative for p in payloads], [p.scale for p in payloads], cut)
    elif all(isinstance(p, Sparse) and (p.indices is not None or p.rule.kind == "randk")
             and p.dtype == h.dtype and p.dim == h.numel() for p in payloads):
        clean = cpu_kernels.without_negative_zero.holds(h)
        fused = _shifted_through_bitmaps(h, payloads, owned) if few else None
        if fused is not None:
            return fused
        supports = [p.support(h.device) for p in payloads]
        values = [p.values.to_dense().to(h.dtype) for p in payloads]
        last = None if cut is None else h[cut:].clone()  # h's last columns before a pass that may write into h
        fused = cpu_kernels.sparse_mean_added(h, supports, values, owned and clean, running=cut is not None)
        if fused is not None and last is not None and last.numel():
            fused[cut:] = last + row_order.interleaved_sum([last_columns(p, cut) for p in payloads]).div_(len(payloads))
        if fused is not None and (clean or not _negative_zero_on(fused, supports)):
            cpu_kernels.without_negative_zero.note(fused)
    return fused if fused is not None else shift(h, mean_of(uplinks, name), owned)


def _shifted_through_bitmaps(h: torch.Tensor, payloads, inplace: bool) -> torch.Tensor | None:
    """h + the mean of sparse payloads whose supports all come as bitmaps (long Rand-K supports,
    ``indices.marked_support``) in one pass without index arrays (``cpu_kernels.marked_mean_added``:
    the bits of ``sparse_mean_added``), marked free of negative zeros where the pass saw none; None
    where a support has no bitmap. An M3 server at d = 1e7 with 4 workers drew, copied and read
    four index arrays of d/4 entries a step for the other way. The pass writes every coordinate, so
    ``inplace`` (the caller owns h) needs no mark on h. No bitmap is drawn where the pass cannot
    run: h on another device or of another dtype, a payload with its indices sent."""
    if (h.device.type != "cpu" or h.dtype not in cpu_kernels.MARKED_DTYPES or not h.is_contiguous()
            or any(p.indices is not None for p in payloads)):
        return None
    marked = []
    for p in payloads:
        marked.append(index_sets.marked_support(p.rule))
        if marked[-1] is None:
            return None
    done = cpu_kernels.marked_mean_added(h, [m[0] for m in marked], [p.values.to_dense().to(h.dtype) for p in payloads], inplace)
    if done is None:
        return None
    fused, negative_zero = done
    if not negative_zero:
        cpu_kernels.without_negative_zero.note(fused)
    return fused


def _negative_zero_on(v: torch.Tensor, supports: list[torch.Tensor]) -> bool:
    """Whether v holds a -0 at an index of the supports."""
    return any(bool(((kept == 0) & kept.signbit()).any()) for kept in (v.index_select(0, s) for s in supports))


def shift(h: torch.Tensor, c, owned: bool = False) -> torch.Tensor:
    """h + c, where c is a received payload (added as its dense form, ``add_dense``) or an already
    dense tensor (an average). With ``owned`` (h is the caller's own state, which it replaces by the
    result and which nothing else holds) h is updated in place and returned: no new vector, and a
    sparse c changes h on its support alone where h holds no negative zero (``add_dense``), O(k)
    instead of a pass over d. The same bits either way."""
    if isinstance(c, torch.Tensor):
        return h.add_(c) if owned else h + c
    return add_dense(h, c, inplace=owned)
