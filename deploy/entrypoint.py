"""The container's entrypoint: `psc`, plus a check for compose clusters (docs/deploy.md).

    python entrypoint.py [PSC ARGUMENTS]       (the image: tini -> this -> python -m psc ...)

Without SCALE_CHECK_SERVICE it simply becomes psc (exec): `docker run IMAGE list algorithms`.
With it (docker-compose.yml sets it to `worker`) it runs psc as its child, hands it every SIGTERM,
SIGINT, SIGHUP and SIGQUIT it gets (tini, PID 1, hands `docker stop`'s SIGTERM to this process), and
exits with psc's status (128 + N when psc died of signal N), while it checks the cluster:

- The scale. It counts the containers of service SCALE_CHECK_SERVICE by resolving that name on the
  compose network (Docker's DNS answers with one address per running container) and compares the
  count with the number of workers the server waits for: for `psc server` its --workers (or
  PSC_SERVER_WORKERS, or `workers` in the --config file), for `psc worker` SCALE_CHECK_WORKERS.
  More containers than that, or fewer once the count has not changed for SCALE_CHECK_SETTLE seconds
  (15), is an error that names both numbers: psc is stopped (SIGTERM) and this process exits 1.
  No container of the service at all is not checked (`docker compose up server`, remote workers).
- The other side. A worker stops (exit 1) once the host of its --connect endpoint (the server's
  container) has not resolved for SCALE_CHECK_GONE seconds (10), and a server whose worker
  containers have all gone for that long stops too, instead of waiting out --join-timeout.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
GLOBAL_FLAGS = {"--debug", "--quiet", "-q"}


def say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# -- what psc will run ----------------------------------------------------------------------------
def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """(psc's command, that command's arguments): `--debug server --workers 2` -> ('server', [...])."""
    for i, arg in enumerate(argv):
        if arg in GLOBAL_FLAGS:
            continue
        if arg.startswith("-"):
            return None, []
        return arg, argv[i + 1:]
    return None, []


def option(args: list[str], name: str) -> str | None:
    """The value of --name in a click command line (the last one wins), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def setting(command: str, args: list[str], name: str, env: dict[str, str]) -> str | None:
    """An option of `psc COMMAND` as psc resolves it: the command line, then PSC_COMMAND_NAME (an
    empty variable is unset), then the --config TOML file."""
    value = option(args, "--" + name)
    if value is not None:
        return value
    value = env.get(f"PSC_{command.upper()}_{name.upper().replace('-', '_')}") or None
    if value is not None:
        return value
    config = option(args, "--config") or env.get(f"PSC_{command.upper()}_CONFIG") or None
    if config and tomllib is not None:
        try:
            with open(config, "rb") as fh:
                found = tomllib.load(fh).get(name.replace("-", "_"))
        except (OSError, ValueError):
            return None
        return None if found is None else str(found)
    return None


# -- the compose scale check ---------------------------------------------------------------------
def count_containers(service: str) -> int:
    """How many containers answer to `service` on this network (one address each; IPv4 and IPv6
    addresses of one container are not counted twice)."""
    try:
        infos = socket.getaddrinfo(service, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return 0
    v4 = {i[4][0] for i in infos if i[0] == socket.AF_INET}
    v6 = {i[4][0] for i in infos if i[0] == socket.AF_INET6}
    return max(len(v4), len(v6))


def mismatch(running: int, expected: int, service: str, who: str) -> str:
    return (f"compose runs {running} container{'s' if running != 1 else ''} of service '{service}' "
            f"(--scale {service}={running}) but {who} waits for {expected} worker{'s' if expected != 1 else ''} "
            f"(WORKERS={expected}): the two must agree; start it with "
            f"WORKERS={running} ... up --scale {service}={running}, or scale to {expected}")


def check_scale(expected: int, count, service: str = "worker", who: str = "the server", settle: float = 15.0,
                poll: float = 0.5, alive=lambda: True, clock=time.monotonic, sleep=time.sleep, emit=say) -> str | None:
    """Watch the number of `service` containers while ``alive()``: an error message on a mismatch
    with ``expected``, None once the count has equalled it for ``settle`` seconds (or never rose
    above 0: no containers of the service, the workers are elsewhere)."""
    seen, since, ok_since = -1, clock(), None
    while alive():
        n = count()
        now = clock()
        if n != seen:
            seen, since = n, now
        if n > expected:
            return mismatch(n, expected, service, who)
        if n == expected and ok_since is None:
            ok_since = now
        if ok_since is not None and now - ok_since >= settle:
            emit(f"psc entrypoint: {n} container{'s' if n != 1 else ''} of service '{service}', as {who} expects")
            return None
        if ok_since is None and n > 0 and now - since >= settle:  # fewer, and no more are coming
            return mismatch(n, expected, service, who)
        sleep(poll)
    return None


# -- the supervisor ------------------------------------------------------------------------------
def psc_argv(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "psc", *argv]


def server_gone(host: str, gone_s: float, alive, clock=time.monotonic, sleep=time.sleep, poll: float = 1.0) -> bool:
    """True once ``host`` has not resolved for ``gone_s`` seconds on end while ``alive()``."""
    since = None
    while alive():
        if count_containers(host):
            since = None
        elif since is None:
            since = clock()
        elif clock() - since >= gone_s:
            return True
        sleep(poll)
    return False


def main(argv: list[str]) -> int:
    env = os.environ
    command, args = split_command(argv)
    service = env.get("SCALE_CHECK_SERVICE", "").strip()
    expected = None
    if service and command in ("server", "worker"):
        raw = setting("server", args, "workers", env) if command == "server" else env.get("SCALE_CHECK_WORKERS")
        try:
            expected = int(raw) if raw else None
        except ValueError:
            expected = None
        if expected is None:
            say(f"psc entrypoint: SCALE_CHECK_SERVICE={service} but no worker count to check it against; not checked")
    if expected is None:
        os.execv(sys.executable, psc_argv(argv))  # nothing to add: become psc

    # psc in a process group of its own: a terminal's Ctrl-C reaches it once, through this process.
    pending: list[int] = []
    holder: list[subprocess.Popen] = []

    def forward(signum, _frame):
        if not holder:
            pending.append(signum)
            return
        try:
            holder[0].send_signal(signum)
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    child = subprocess.Popen(psc_argv(argv), **group)
    holder.append(child)
    for signum in pending:  # a signal that came before psc started
        child.send_signal(signum)
    failure: list[str] = []
    alive = lambda: child.poll() is None  # noqa: E731

    def stop(msg: str) -> None:
        if child.poll() is None:
            failure.append(msg)
            say(f"psc entrypoint: error: {msg}")
            child.send_signal(signal.SIGTERM)

    # Name lookups that fail fast (on a network without outside DNS a missing name would take
    # seconds); psc itself, started above, keeps the resolver's defaults.
    os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
    settle = float(env.get("SCALE_CHECK_SETTLE") or 15.0)
    gone_s = float(env.get("SCALE_CHECK_GONE") or 10.0)

    def watch():
        msg = check_scale(expected, lambda: count_containers(service), service, "the server", settle, alive=alive)
        if msg is not None:
            if command == "worker":  # let the server's check see this container before it goes
                say(f"psc entrypoint: error: {msg}")
                deadline = time.monotonic() + min(settle, 5.0)
                while alive() and time.monotonic() < deadline:
                    time.sleep(0.2)
            return stop(msg)
        if command == "worker":
            endpoint = setting("worker", args, "connect", env) or ""
            host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            if host and server_gone(host, gone_s, alive):
                stop(f"the server's container ({host}) is gone; this worker stops instead of waiting for it")
        elif server_gone(service, gone_s, alive):  # the workers it counted have all exited
            stop(f"every container of service '{service}' has exited but the server still runs; it stops too")

    threading.Thread(target=watch, daemon=True).start()
    code = child.wait()
    if failure:
        say(f"psc entrypoint: error: {failure[0]}")
        return 1
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
