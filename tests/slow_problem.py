"""A problem whose workers are slow on purpose, for the liveness tests over real processes.

``custom:factory=tests.slow_problem:make`` is a tiny classifier (a linear layer on 4 features). The
process that builds it reads two environment variables, so a test slows the workers and not the
server by setting them in the workers' environment only:

* ``PSC_TEST_BUILD_SLEEP``: seconds to sleep while the problem is built (loading data, say);
* ``PSC_TEST_ORACLE_SLEEP``: seconds the training loss sleeps on every gradient (a long step), from
  gradient number ``PSC_TEST_ORACLE_SLEEP_FROM`` on (0, the first, by default);
* ``PSC_TEST_EVAL_SLEEP``: seconds the loss sleeps when it runs without autograd, i.e. in the
  server's evaluation of the model after each round.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

BUILD_SLEEP = "PSC_TEST_BUILD_SLEEP"
ORACLE_SLEEP = "PSC_TEST_ORACLE_SLEEP"
ORACLE_SLEEP_FROM = "PSC_TEST_ORACLE_SLEEP_FROM"
EVAL_SLEEP = "PSC_TEST_EVAL_SLEEP"


def make(**_options):
    time.sleep(float(os.environ.get(BUILD_SLEEP, "0")))
    delay = float(os.environ.get(ORACLE_SLEEP, "0"))
    eval_delay = float(os.environ.get(EVAL_SLEEP, "0"))
    grads = {"seen": 0, "slow_from": int(os.environ.get(ORACLE_SLEEP_FROM, "0"))}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = (x[:, 0] > 0).long()

    def loss(out, target):
        if torch.is_grad_enabled():  # a worker's gradient
            grads["seen"] += 1
            time.sleep(delay if grads["seen"] > grads["slow_from"] else 0.0)
        else:  # the server's evaluation
            time.sleep(eval_delay)
        return F.cross_entropy(out, target)

    return {"model": torch.nn.Linear(4, 2), "train": (x[:48], y[:48]), "test": (x[48:], y[48:]), "loss": loss}
