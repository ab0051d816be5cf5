"""The run's configuration: what the server is started with and sends to every worker at registration."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class RunConfig:
    algorithm: str = "gd"
    uplink: str | None = None  # None: the algorithm's default
    downlink: str | None = None
    problem: str = "quadratic"
    workers: int = 4
    rounds: int = 100
    lr: str = "theory"  # a number, "theory" or "theory*F"
    seed: int = 0
    dtype: str = "float32"  # the model's and the wire's value precision
    eval_every: int = 1  # the server evaluates the model every K rounds, and in the first and last

    def evaluated(self, t: int) -> bool:
        """Whether the server evaluates the model after round ``t``."""
        return t % self.eval_every == 0 or t == self.rounds - 1

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be at least 1")
        if self.rounds < 0:
            raise ValueError(f"rounds={self.rounds} must be non-negative")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every!r} must be a positive integer")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        parse_lr(self.lr)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ValueError("run configuration must be a mapping")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown run option {unknown[0]!r}")
        kwargs = {}
        for key, value in data.items():
            kind = names[key].type
            if value is None:
                kwargs[key] = None
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"run option {key}={value!r} must be an integer")
                kwargs[key] = value
            else:
                kwargs[key] = str(value)
        return cls(**kwargs)


_LR = re.compile(r"^\s*theory\s*(?:\*\s*(?P<f>[0-9.eE+-]+))?\s*$")


def parse_lr(text: str) -> tuple[str, float]:
    """("fixed", value) or ("theory", factor); ValueError on anything else."""
    m = _LR.match(str(text))
    if m:
        factor = float(m.group("f")) if m.group("f") else 1.0
        if not factor > 0:
            raise ValueError(f"lr={text!r}: the factor must be positive")
        return "theory", factor
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"lr={text!r} must be a number, 'theory' or 'theory*F'") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"lr={text!r} must be a positive finite number")
    return "fixed", value
