"""Helpers for tests that drive a run in one process, round by round, with the engine's own loop
(``runtime.engine.Engine``): the same cores, rules and wire format as the real processes."""
from __future__ import annotations

from common.config import RunConfig
from runtime.engine import Engine


def drive(config: RunConfig):
    """Yield (t, server_core, worker_cores, down_frames) after each round of the in-process engine."""
    engine = Engine(config)
    try:
        for t, downs in engine.rounds():
            yield t, engine.server, engine.workers, downs
    finally:
        engine.close()


def xs(config: RunConfig) -> list:
    """The server's iterate after each round."""
    return [s.rule.x.clone() for _, s, _, _ in drive(config)]

