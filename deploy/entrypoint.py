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

CurveZMQ keys (docs/deploy.md, "Encrypted runs"), for `psc server` and `psc worker`, before psc starts:

- Key files, from psc's own options or variables (--server-key / PSC_SERVER_SERVER_KEY, --allow /
  PSC_SERVER_ALLOW_DIR, --key / PSC_WORKER_KEY, --server-public / PSC_WORKER_SERVER_PUBLIC), are
  checked here: a missing, unreadable or malformed file (or a folder where a file belongs: what
  Docker mounts when the host path does not exist) stops the container with exit 2 and one line
  that names the option and the path, never a key.
- Key material in variables, for platforms that cannot mount files: CURVE_SECRET_KEY (this
  container's secret key: the server's or the worker's), CURVE_SERVER_PUBLIC (a worker's copy of
  the server's public key) and CURVE_ALLOW_KEYS (the server's allowed worker public keys, separated
  by commas or white space). Each value is a key in Z85 (40 characters) or the text of a
  `psc keygen` file. They are written to a private folder (mode 0700, files 0600) under $TMPDIR,
  passed to psc as the options above, and removed from psc's environment. A variable and the
  option it stands for may not both be given. Values are never printed.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
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


# -- CurveZMQ keys ------------------------------------------------------------------------------
class KeySetupError(Exception):
    """A key that psc could not use; the message is one line and holds no key material."""


Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
KEY_VARIABLES = ("CURVE_SECRET_KEY", "CURVE_SERVER_PUBLIC", "CURVE_ALLOW_KEYS")
MISSING_HINT = "mount the keys (docs/deploy.md, 'Encrypted runs')"


def key_from_text(text: str, what: str, secret: bool) -> bytes:
    """The Z85 key (secret or public) in ``text``: a bare 40-character Z85 key or the text of a key
    file (`public-key = "..."`, `secret-key = "..."` lines, as pyzmq reads them)."""
    field = "secret-key" if secret else "public-key"
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(field):
            found = line.split("=", 1)[1].strip(" \t'\"") if "=" in line else ""
            break
    if found is None:
        bare = text.strip()
        if any(c.isspace() for c in bare):  # a key file's text without the line we need (Z85 has no spaces)
            kind = "secret key: give the NAME.key_secret file" if secret else "public key"
            raise KeySetupError(f"{what}: holds no {kind}")
        found = bare
    if len(found) != 40 or not set(found) <= Z85:
        raise KeySetupError(f"{what}: not a CurveZMQ {'secret' if secret else 'public'} key "
                            f"(40 Z85 characters, or a file written by psc keygen)")
    return found.encode()


def check_key_file(path: str, what: str, secret: bool) -> None:
    """A one-line KeySetupError unless ``path`` is a key file psc can load."""
    where = f"{what} {path}"
    if os.path.isdir(path):
        raise KeySetupError(f"{where}: a folder, not a key file (Docker mounts an empty folder where the "
                            f"host path does not exist: check it); {MISSING_HINT}")
    if not os.path.exists(path):
        raise KeySetupError(f"{where}: no such file; {MISSING_HINT}")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except OSError as exc:
        raise KeySetupError(f"{where}: cannot read it ({exc.strerror}); a secret key file is mode 0600: "
                            f"the container's user must own it") from None
    key_from_text(text, where, secret)


def check_allow_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise KeySetupError(f"{what} {path}: no such folder; {MISSING_HINT}")
    publics = [n for n in sorted(os.listdir(path)) if n.endswith(".key")]
    if not publics:
        raise KeySetupError(f"{what} {path}: holds no public key (*.key) files")
    for name in publics:
        check_key_file(os.path.join(path, name), what, secret=False)


def write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def key_file_text(public: bytes, secret: bytes | None = None) -> str:
    lines = ["#   ****  CURVE key written by the psc container entrypoint  ****", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def curve_public(secret: bytes) -> bytes:
    import zmq  # psc's own dependency, in the image's environment

    return zmq.curve_public(secret)


def curve_setup(command: str | None, args: list[str], env, tmpdir: str | None = None) -> tuple[list[str], str | None]:
    """The CurveZMQ part of `psc server` / `psc worker` in a container: check the key files the
    options name, and write keys given in CURVE_* variables to a private folder. Returns the options
    to add to psc's command line and that folder (None when nothing was written); raises
    KeySetupError with a one-line reason."""
    if command not in ("server", "worker"):
        return [], None
    given = {name: (env.get(name) or "").strip() for name in KEY_VARIABLES}
    if command == "server":
        options = {"--server-key": ("server-key", "CURVE_SECRET_KEY", True),
                   "--allow": ("allow-dir", "CURVE_ALLOW_KEYS", None)}
        if given["CURVE_SERVER_PUBLIC"]:
            raise KeySetupError("CURVE_SERVER_PUBLIC is for workers; the server's key is CURVE_SECRET_KEY")
    else:
        options = {"--key": ("key", "CURVE_SECRET_KEY", True), "--server-public": ("server-public", "CURVE_SERVER_PUBLIC", False)}
        if given["CURVE_ALLOW_KEYS"]:
            raise KeySetupError("CURVE_ALLOW_KEYS is for the server (the workers it admits), not for a worker")
    files = {}
    for opt, (name, var, _secret) in options.items():
        value = option(args, opt)
        if value is None:
            value = env.get(f"PSC_{command.upper()}_{name.upper().replace('-', '_')}") or None
        if value is not None and given[var]:
            raise KeySetupError(f"both {opt} ({value}) and {var} are given; keep one")
        files[opt] = value
    # Check the files named by options.
    for opt, (name, var, secret) in options.items():
        path = files[opt]
        if path is None:
            continue
        if secret is None:
            check_allow_dir(path, opt)
        else:
            check_key_file(path, opt, secret)
    # Write the keys given in variables.
    wanted = [(opt, var, secret) for opt, (_n, var, secret) in options.items() if given[var]]
    extra: list[str] = []
    folder = None
    if wanted:
        folder = tempfile.mkdtemp(prefix="psc-keys-", dir=tmpdir)  # mode 0700
        for opt, var, secret in wanted:
            if secret is None:  # the allow list: one public key file each
                keys = [k for k in re.split(r"[\s,]+", given[var]) if k]
                allow = os.path.join(folder, "allowed")
                os.mkdir(allow, 0o700)
                for i, text in enumerate(keys):
                    public = key_from_text(text, f"{var} (key {i + 1} of {len(keys)})", secret=False)
                    write_private(os.path.join(allow, f"worker{i}.key"), key_file_text(public))
                extra += [opt, allow]
            elif secret:
                key = key_from_text(given[var], var, secret=True)
                try:
                    public = curve_public(key)
                except Exception:  # zmq's error would not name the variable
                    raise KeySetupError(f"{var}: not a CurveZMQ secret key") from None
                path = os.path.join(folder, f"{command}.key_secret")
                write_private(path, key_file_text(public, key))
                extra += [opt, path]
            else:
                public = key_from_text(given[var], var, secret=False)
                path = os.path.join(folder, "server.key")
                write_private(path, key_file_text(public))
                extra += [opt, path]
    # A worker needs both halves (psc says so too, but only after importing torch).
    if command == "worker":
        has_key = files["--key"] is not None or given["CURVE_SECRET_KEY"]
        has_public = files["--server-public"] is not None or given["CURVE_SERVER_PUBLIC"]
        if has_key and not has_public:
            raise KeySetupError("this worker has its secret key but not the server's public key: "
                                "give --server-public / PSC_WORKER_SERVER_PUBLIC or CURVE_SERVER_PUBLIC")
        if has_public and not has_key:
            raise KeySetupError("this worker has the server's public key but no secret key of its own: "
                                "give --key / PSC_WORKER_KEY or CURVE_SECRET_KEY")
    elif files["--allow"] is not None or given["CURVE_ALLOW_KEYS"]:
        if files["--server-key"] is None and not given["CURVE_SECRET_KEY"]:
            raise KeySetupError("an allow list needs the server's secret key too: give --server-key / "
                                "PSC_SERVER_SERVER_KEY or CURVE_SECRET_KEY")
    return extra, folder


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
    try:
        extra, _folder = curve_setup(command, args, env)
    except KeySetupError as exc:
        say(f"psc entrypoint: error: {exc}")
        return 2
    except OSError as exc:  # the private folder could not be written
        say(f"psc entrypoint: error: cannot write the keys from CURVE_* variables ({exc.strerror})")
        return 2
    for name in KEY_VARIABLES:  # psc gets files, not key material
        env.pop(name, None)
    argv, args = argv + extra, args + extra
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
