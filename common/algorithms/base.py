"""Algorithm rules: each method is a pure server rule and a pure worker rule that exchange messages.

One round t, as the runtime drives it:

    worker i:  msg_up_i = worker_rule.uplink(t)            (calls its gradient oracle as it needs)
               worker_rule.settle(t, msg_up_i)             (what the uplink does not depend on; after sending)
    server:    msgs_down = server_rule.step(t, [msg_up_1..msg_up_n])   (one message per worker)
               server_rule.settle(t)                       (what no downlink depends on; after sending)
    worker i:  worker_rule.downlink(t, msgs_down[i])

Rules never touch sockets, clocks or files: the in-process engine and the real processes drive the
same rules through the same wire format. All state that must agree on two sides is updated from
what the receiver decodes. ``state_dict``/``load_state_dict`` save and restore a rule.

An ``Algorithm`` names the two rules, its default compressors, its options, and the step size its
paper's theorem gives (``theory_lr``), used by ``lr=theory`` and ``lr=theory*F``. It is registered
with ``@register`` (``common.options.Registry``, shared with compressors and problems) and built
from its SPEC by ``ALGORITHMS.build("marina:p=0.3")``, which checks the options.

The pieces several rules share have a module each: ``memory`` (error feedback, the Markov shift),
``schedule`` (the staircase step size), ``sync`` (p = 1/(omega + 1)), ``marina_p_downlink``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from common.algorithms import row_order
from common.compressors import Compressor, build, cpu_kernels
from common.compressors.payloads import Dense, Signs, Sparse, add_dense
from common.config import RunConfig, parse_lr
from common.keys import StreamKey
from common.compressors.message import Message
from common.options import Param, Registry, parse_options
from common.oracle import Oracle, gradient_of


@dataclass
class RuleContext:
    """What both rules of one run know: sizes, seed, step size, options and compressors."""

    config: RunConfig
    dim: int
    options: dict[str, Any]
    problem_constants: dict[str, float]
    uplink_spec: str
    downlink_spec: str
    lr: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def n(self) -> int:
        return self.config.workers

    @property
    def dtype(self) -> torch.dtype:
        return self.config.torch_dtype

    @property
    def seed(self) -> int:
        return self.config.seed

    def compressor(self, spec: str, purpose: str) -> Compressor:
        return build(spec, self.dim, self.n, self.config.seed, purpose=purpose)

    @functools.cached_property
    def uplink(self) -> Compressor:
        return self.compressor(self.uplink_spec, "uplink")

    @functools.cached_property
    def downlink(self) -> Compressor:
        return self.compressor(self.downlink_spec, "downlink")

    def coin(self, step: int, p: float, name: str = "coin") -> bool:
        """A Bernoulli(p) coin shared by everybody at ``step`` (drawn by the server, sent as a flag)."""
        gen = StreamKey(self.seed, step, 0, name).torch_generator("cpu")
        return bool(torch.rand(1, generator=gen, dtype=torch.float64)[0] < p)


def dense(payload) -> torch.Tensor:
    return payload.to_dense()


# Up to how many vectors a running sum gives torch.stack(...).mean(0) bit for bit: ATen's dim-0
# reduction adds the rows one after the other for up to 4 rows of float32/float64 (checked in
# tests/test_algorithms_reductions.py), but not for more rows, nor for half precision. For 5 to 17
# long CPU vectors ``row_order`` gives ATen's order without the stack.
RUNNING_SUM_ROWS = {torch.float32: 4, torch.float64: 4}


def mean_of(uplinks: list[Message], name: str) -> torch.Tensor:
    """(1/n) sum_i of the decoded payload ``name`` of every worker's uplink, bit-identical to
    ``torch.stack(...).mean(0)``. For up to 4 float32/float64 vectors it is a running sum in one
    buffer, then one division: 2.5x faster than stacking (at d = 1e7, n = 2: 9 ms against 22).
    Scaled-sign and sparse payloads are added to the sum without their dense forms (``add_dense``).
    torch's reduction starts from +0, so its sum is never -0; the running sum is -0 exactly where
    every row is -0, and adding +0 before the division gives torch's +0 there (and changes nothing
    else). For 5 to 17 long CPU vectors the sum is ATen's, in its order, without the stack
    (``row_order``): for sign and sparse payloads the running sum, then ATen's last columns from those
    columns' dense forms alone (``last_columns``)."""
    payloads = [m.payloads[name] for m in uplinks]
    first, n = payloads[0], len(payloads)
    few = 1 < n <= RUNNING_SUM_ROWS.get(first.dtype, 0)
    if (all(isinstance(p, (Signs, Sparse)) and p.dtype == first.dtype and p.dim == first.dim for p in payloads)
            and (few or n in row_order.ORDERED_ROWS)):
        total = dense(first)  # a new vector for these kinds: the sum can go into it
        cut = None if few else row_order.first_interleaved([total] * n)
        if not few and cut is None:
            return average([total] + [dense(p) for p in payloads[1:]])
        for p in payloads[1:]:
            add_dense(total, p, inplace=True)  # the same additions, without the other dense forms
        total.add_(0.0)
        if cut is not None and cut < total.numel():
            total[cut:] = row_order.interleaved_sum([last_columns(p, cut) for p in payloads])
        return total.div_(n)
    return average([dense(p) for p in payloads])


def last_columns(payload, cut: int) -> torch.Tensor:
    """The dense form of a payload's columns cut .. d - 1 alone (ATen's last columns, ``row_order``):
    for a scaled sign its flags there, for a sparse payload the part of its support there."""
    if isinstance(payload, Signs):
        scale = payload.scale.to(payload.dtype)
        return torch.where(payload.negative[cut:], -scale, scale)
    if isinstance(payload, Sparse):
        kept = payload.values.to_dense().to(payload.dtype)
        support = payload.support(kept.device)
        there = support >= cut
        out = torch.zeros(payload.dim - cut, dtype=payload.dtype, device=kept.device)
        return out.index_put_((support[there] - cut,), kept[there])
    return dense(payload)[cut:]


def average(vectors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(vectors).mean(0)``, bit for bit (see ``mean_of``; for NaNs of different signs,
    which one is kept may differ: ``row_order``): a running sum for up to 4 float32/float64 vectors,
    ATen's order without the stack for 5 to 17 long CPU ones (``row_order``), else the stack."""
    first = vectors[0]
    alike = all(v.shape == first.shape and v.dtype == first.dtype for v in vectors)  # add would broadcast
    if not (alike and 1 < len(vectors) <= RUNNING_SUM_ROWS.get(first.dtype, 0)):
        ordered = row_order.ordered_sum(vectors) if alike else None
        if ordered is not None:
            return ordered.div_(len(vectors))
        return torch.stack(vectors).mean(0)  # which refuses vectors of different lengths
    total = torch.add(vectors[0], vectors[1])
    for v in vectors[2:]:
        total.add_(v)
    return total.add_(0.0).div_(len(vectors))


def descend(x: torch.Tensor, lr: float, g: torch.Tensor) -> torch.Tensor:
    """x - lr g, the step of the gradient methods (GD, DCGD, PSGD, MARINA, MARINA-P, M3, EF21, EF21-P,
    EF21-SGD, EF-SGD, Mem-SGD, Double-Squeeze, NEOLITHIC; a step of 1 gives x - g),
    as a new vector: torch's ``x - lr * g``, or, for long CPU vectors, one compiled pass with the same
    bits (``cpu_kernels.descend``; at d = 1e7 about 5 ms against 20-30)."""
    out = cpu_kernels.descend(x, lr, g)
    return x - lr * g if out is None else out


def _plain_step(lr: float, dtype: torch.dtype) -> bool:
    """Whether lr, rounded to ``dtype`` as torch rounds a step, is +0 or a positive finite number:
    then lr * 0 is +0, and x_i - lr * 0 is x_i for every x_i (not for -0, a negative or an inf step)."""
    rounded = float(torch.tensor(float(lr), dtype=dtype))
    return math.isfinite(rounded) and math.copysign(1.0, rounded) > 0


def indices_sent(payload, x: torch.Tensor) -> bool:
    """Whether ``payload`` is sparse with its indices sent (Top-K), of the dtype and length of the
    vector x it is added to."""
    return (isinstance(payload, Sparse) and payload.indices is not None and payload.dtype == x.dtype
            and x.dim() == 1 and payload.dim == x.numel())


def support_step(x: torch.Tensor, lr: float, payload) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(support, -(c lr)) of a Top-K payload c (``indices_sent``), for a step lr that is +0 or
    positive and finite in x's precision: adding them to x on the support (``cpu_kernels.add_on_support``)
    gives the bits of x - lr * c's dense form, since elsewhere x_i - lr * 0 = x_i (-0 included) and
    c lr = lr c, with lr in x's precision, as torch rounds it. None otherwise."""
    if not (indices_sent(payload, x) and isinstance(lr, (int, float)) and _plain_step(lr, x.dtype)):
        return None
    step = payload.values.to_dense().to(x.dtype) * lr
    return (payload.indices.to(x.device), step.neg_()) if step.device == x.device else None


def descend_by(x: torch.Tensor, lr: float, payload) -> torch.Tensor:
    """x - lr * the payload's dense form: ``descend(x, lr, dense(payload))``, bit for bit. For a Top-K
    payload on a long CPU x (``support_step``), a copy of x with the support alone stepped: a copy
    and O(k) instead of the dense form and a pass over both."""
    taken = support_step(x, lr, payload)
    if taken is not None:
        out = x.detach().clone()
        if cpu_kernels.add_on_support(out, *taken) is not None:
            return out
    return descend(x, lr, dense(payload))


def descend_by_mean(x: torch.Tensor, lr: float, uplinks: list[Message], name: str) -> torch.Tensor:
    """x - lr (1/n) sum_i (payload ``name`` of uplink i): ``descend(x, lr, mean_of(uplinks, name))``,
    bit for bit. Where every payload is uncompressed (GD's, PSGD's, MARINA-P's and EF21-P's uplinks,
    DCGD's with an identity uplink) and long, the mean and the step are one compiled pass over the
    received vectors (``cpu_kernels.mean_descend``): at d = 1e7 and n = 2 one pass instead of five.
    For 5 to 14 such uplinks the pass adds them in ATen's order (``row_order``), without the stack:
    at d = 1e7 and n = 8 in 13 ms against 62-270 ms for the stack, its mean and the step. Where 2 to
    4 payloads are sparse with their indices sent (Top-K: EF-SGD's and DCGD's uplinks), one compiled
    pass over x adds their values a block at a time (``cpu_kernels.sparse_mean_descend``), without
    the dense forms or the mean as vectors."""
    payloads = [m.payloads[name] for m in uplinks]
    if all(indices_sent(p, x) for p in payloads):
        values = [p.values.to_dense().to(x.dtype) for p in payloads]
        out = cpu_kernels.sparse_mean_descend(x, lr, [p.indices for p in payloads], values)
        if out is not None:
            return out
    if all(isinstance(p, Dense) and p.values.dtype == p.dtype == x.dtype for p in payloads):
        rows = [p.values for p in payloads]
        if 1 < len(rows) <= RUNNING_SUM_ROWS.get(x.dtype, 0):
            out = cpu_kernels.mean_descend(x, lr, rows)
        else:
            cut = row_order.first_interleaved(rows) if rows[0].shape == x.shape else None
            out = None if cut is None else cpu_kernels.mean_descend(x, lr, rows, interleaved_from=cut)
        if out is not None:
            return out
    return descend(x, lr, mean_of(uplinks, name))


def full(x: torch.Tensor, copy: bool = True) -> Dense:
    """An uncompressed vector as a payload: a copy, so later in-place updates do not leak; or, with
    ``copy=False``, ``x`` itself, for a vector the rule never changes in place (a fresh gradient, a
    model that each step replaces). The link sends a payload's memory without copying it (``encode_node``),
    so at d = 1e7 this saves a 40 MB copy on each side of a dense round. Without ``copy`` the payload
    holds ``x`` itself where it needs no detaching, so that a mark of the pass that wrote it (a
    finite vector, ``cpu_kernels.known_finite``) lives as long as the payload does: a detached alias
    would let a gradient that only the payload holds die with its mark before it is encoded."""
    if copy:
        return Dense(x.detach().clone(), x.dtype)
    return Dense(x.detach() if x.requires_grad else x, x.dtype)


class ServerRule:
    def __init__(self, ctx: RuleContext, x0: torch.Tensor):
        self.ctx = ctx
        self.x = x0.to(ctx.device, ctx.dtype).clone()

    @property
    def model(self) -> torch.Tensor:
        """The point the metrics are measured at."""
        return self.x

    def step(self, t: int, uplinks: list[Message]) -> list[Message]:
        raise NotImplementedError

    def settle(self, t: int) -> None:
        """The rest of round ``t``'s update, which no downlink of the round depends on: the server's
        own copy of a model that the workers step themselves. The runtime runs it after the
        downlinks are on their way, while the workers compute (``runtime.server_core``), and always
        before anything reads the rule's state and before the next ``step``. Nothing by default."""

    def round_metrics(self) -> dict[str, Any]:
        """Extra fields for this round's metrics line (e.g. communication rounds per iteration)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items() if k != "ctx" and not isinstance(v, Compressor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone() if isinstance(v, torch.Tensor) else v)


class WorkerRule:
    def __init__(self, ctx: RuleContext, rank: int, oracle: Oracle, x0: torch.Tensor):
        self.ctx, self.rank, self.oracle = ctx, rank, oracle
        self.x = x0.to(ctx.device, ctx.dtype).clone()

    def grad(self, point: torch.Tensor, step: int) -> torch.Tensor:
        """The worker's gradient at ``point``; ``step`` names the sample draw (the same step gives the
        same minibatch for a stochastic oracle), so a rule that needs R draws per round passes
        t * R + r."""
        return gradient_of(self.oracle, point, step)

    def uplink(self, t: int) -> Message:
        raise NotImplementedError

    def settle(self, t: int, sent: Message) -> None:
        """The rest of round ``t``'s uplink step, which the message ``sent`` (what ``uplink`` returned)
        does not depend on: a Markov state h += c. The runtime runs it after the uplink is on its way,
        while it crosses the link and the server works (``runtime.worker_core``), and always before
        the downlink, the next uplink, or anything that reads the rule's state. It must not change
        ``sent``'s tensors, which the link may still be sending. Nothing by default."""

    def downlink(self, t: int, msg: Message) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        skip = ("ctx", "oracle")
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items() if k not in skip and not isinstance(v, Compressor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone() if isinstance(v, torch.Tensor) else v)


class Algorithm:
    """A method: its two rules, default compressors, options and theory step size.

    ``Algorithm(options)`` checks the SPEC's ``key=value`` options against ``params`` (every option
    present afterwards, unset ones at their default); ``context`` then builds a run's ``RuleContext``.
    """

    name: str = ""
    paper: str = ""
    summary: str = ""
    sends: str = ""  # what each side sends, for `psc list algorithms`
    server_rule: type[ServerRule]
    worker_rule: type[WorkerRule]
    default_uplink: str = "identity"  # may say {k} for K = d // n
    default_downlink: str = "identity"
    fixed_uplink: bool = False  # the method's uplink is uncompressed by definition
    fixed_downlink: bool = False
    params: tuple[Param, ...] = ()

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = parse_options(f"algorithm {self.name}", self.params, options or {})

    @staticmethod
    def default_spec(spec: str, dim: int, n: int) -> str:
        """A default compressor spec may say ``{k}`` for the papers' K = d/n (at least 1)."""
        return spec.format(k=max(1, dim // n))

    def theory_lr(self, ctx: RuleContext) -> float | None:
        """The step size of the method's theorem, or None where the paper gives no formula."""
        return None

    def context(self, config: RunConfig, dim: int, problem_constants: dict[str, float]) -> RuleContext:
        for side, fixed, given in (("uplink", self.fixed_uplink, config.uplink), ("downlink", self.fixed_downlink, config.downlink)):
            if fixed and given not in (None, "identity"):
                raise ValueError(f"algorithm {self.name} sends its {side} uncompressed; --{side} {given!r} does not apply")
        ctx = RuleContext(
            config=config, dim=dim, options=dict(self.options), problem_constants=problem_constants,
            uplink_spec=config.uplink or self.default_spec(self.default_uplink, dim, config.workers),
            downlink_spec=config.downlink or self.default_spec(self.default_downlink, dim, config.workers),
        )
        ctx.uplink, ctx.downlink  # build both once so a bad spec fails before anything starts
        kind, value = parse_lr(config.lr)
        if kind == "fixed":
            ctx.lr = value
        else:
            theory = self.theory_lr(ctx)
            if theory is None:
                raise ValueError(f"algorithm {self.name} has no theory step size for this problem; give --lr a number")
            ctx.lr = theory * value
        return ctx


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
register = ALGORITHMS.register  # class decorator: ``@register`` makes an algorithm buildable by its name


def need_constants(ctx: RuleContext, *names: str) -> list[float]:
    missing = [n for n in names if n not in ctx.problem_constants]
    if missing:
        raise ValueError(f"the theory step size needs the problem's {', '.join(missing)}, which this problem does not know; give --lr a number")
    return [ctx.problem_constants[n] for n in names]
