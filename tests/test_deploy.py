"""deploy/: the compose files, the Dockerfile, the run file and the launcher agree with the CLI.

The compose files are parsed with PyYAML and every `psc` command line in them (and in
docs/deploy.md) is checked against the click command tree of `psc.cli.main`: an option the CLI does
not have, or a PSC_* environment variable that no option reads, fails. The server's command, its
environment and deploy/run.toml are then parsed by click and built into a run, exactly as the
container would. Where a docker client that can run `docker compose config` (or `docker-compose
config`) exists, it validates the files too; elsewhere that part is skipped.
"""
from __future__ import annotations

import os
import re
import signal
import shlex
import shutil
import subprocess
import sys
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import click
import pytest

from runtime.setup import RunSetup
from psc.cli import main
from psc.runopts import build_config, read_toml
from tests.procs import finish, free_port, kill_all, records, start

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose files")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
COMPOSE_CURVE = DEPLOY / "docker-compose.curve.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = ROOT / "docs" / "deploy.md"


# -- the CLI, as click sees it -------------------------------------------------------------------
def cli_tree() -> dict[tuple[str, ...], tuple[click.Command, click.Context]]:
    """Every command by its path (() is `psc` itself), with a context that carries click's env prefix."""
    tree = {}

    def walk(cmd, ctx, path):
        tree[path] = (cmd, ctx)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, click.Context(sub, info_name=name, parent=ctx), path + (name,))

    walk(main, click.Context(main, info_name="psc", auto_envvar_prefix="PSC"), ())
    return tree


def cli_env_vars() -> dict[str, tuple[tuple[str, ...], click.Option]]:
    """Each environment variable an option reads (click's auto_envvar_prefix rule: the prefix of the
    command and the option's *parameter name*, e.g. --config is PSC_SERVER_CONFIG)."""
    names = {}
    for path, (cmd, ctx) in cli_tree().items():
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            explicit = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or ())
            for name in explicit:
                names[name] = (path, p)
            if p.allow_from_autoenv and ctx.auto_envvar_prefix and p.name:
                names[f"{ctx.auto_envvar_prefix}_{p.name.upper()}"] = (path, p)
    return names


def resolve_command(args: list[str]) -> tuple[tuple[str, ...], click.Command, list[str], list[str]]:
    """Split `psc` arguments into (command path, command, psc's own options, the command's arguments)."""
    tree = cli_tree()
    path: tuple[str, ...] = ()
    own: list[str] = []
    i = 0
    cmd = main
    while isinstance(cmd, click.Group):
        while i < len(args) and args[i].startswith("-"):
            own.append(args[i])
            i += 1
        assert i < len(args), f"psc {' '.join(args)}: no command"
        assert args[i] in cmd.commands, f"psc {' '.join(args)}: {' '.join(path + (args[i],))!r} is not a psc command"
        path += (args[i],)
        cmd = tree[path][0]
        i += 1
    return path, cmd, own, args[i:]


def unknown_options(cmd: click.Command, args: list[str]) -> list[str]:
    """The option names in ``args`` that ``cmd`` does not have (values are not checked here)."""
    opts = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            for o in (*p.opts, *p.secondary_opts):
                opts[o] = p
    bad, i = [], 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            break
        if not tok.startswith("-") or tok == "-":
            continue
        name = tok.split("=", 1)[0]
        p = opts.get(name)
        if p is None:
            bad.append(name)
        elif not p.is_flag and "=" not in tok:
            i += 1  # its value
    return bad


def check_psc_args(args: list[str], where: str) -> tuple[tuple[str, ...], click.Command, list[str]]:
    path, cmd, own, rest = resolve_command(args)
    bad = unknown_options(main, own) + unknown_options(cmd, rest)
    assert not bad, f"{where}: psc {' '.join(path)} has no option {', '.join(bad)} (psc {' '.join(path)} --help)"
    return path, cmd, rest


# -- the compose files -------------------------------------------------------------------------------
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-") and (val is None or (op == ":-" and val == "")):
            return arg
        if op in (":?", "?") and (val is None or (op == ":?" and val == "")):
            raise AssertionError(f"compose variable {name} is required: {arg}")
        return val or ""

    return VAR.sub(sub, value)


def mount_target(v) -> str:
    return v["target"] if isinstance(v, dict) else v.split(":")[1]


def merge(base, over, key=None):
    """Compose's merge of an override file, as far as these checks need it (mappings merge;
    volumes merge by their target in the container)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if key == "volumes" and isinstance(base, list) and isinstance(over, list):
        targets = {mount_target(v) for v in over}
        return [v for v in base if mount_target(v) not in targets] + over
    return over


def load_compose(*files: Path, env: dict[str, str] | None = None) -> dict:
    data: dict = {}
    for f in files:
        data = merge(data, yaml.safe_load(f.read_text()))
    return interpolate(data, env or {})


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def volumes(service: dict) -> list[tuple[Path, str, bool]]:
    """(host path, container path, writable) of each bind mount, relative to the compose folder."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            src, dst, rw = v["source"], v["target"], not v.get("read_only", False)
        else:
            parts = v.split(":")
            src, dst, rw = parts[0], parts[1], "ro" not in parts[2:]
        out.append(((DEPLOY / src).resolve(), dst, rw))
    return out


def to_host(args: list[str], service: dict) -> list[str]:
    """Container paths in a command, rewritten to the host files mounted there."""
    out = []
    for a in args:
        for src, dst, _ in volumes(service):
            if a == dst or a.startswith(dst.rstrip("/") + "/"):
                a = str(src) + a[len(dst.rstrip("/")):]
        out.append(a)
    return out


def endpoint_port(endpoint: str) -> tuple[str, int]:
    m = re.fullmatch(r"tcp://(.+):(\d+)", endpoint)
    assert m, f"{endpoint!r} is not tcp://HOST:PORT"
    return m.group(1), int(m.group(2))


def container_ports(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports") or []:
        target = p["target"] if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0]
        ports.add(int(target))
    return ports


def parse_service(service: dict, name: str, monkeypatch) -> tuple[tuple[str, ...], click.Context]:
    """Parse a service's command and environment with click, as `psc` in its container would."""
    args = service.get("command")
    assert isinstance(args, list), f"service {name}: give the command as a list (the entrypoint is psc)"
    path, cmd, rest = check_psc_args(args, f"service {name}")
    known = cli_env_vars()
    for var in list(os.environ):
        if var.startswith("PSC_"):
            monkeypatch.delenv(var)
    for var, value in environment(service).items():
        if not var.startswith("PSC_"):
            continue
        assert var in known, f"service {name}: {var} is read by no psc option (known: {', '.join(sorted(known))})"
        var_path, _ = known[var]
        assert var_path in ((), path), f"service {name} runs psc {' '.join(path)}, but {var} is an option of psc {' '.join(var_path)}"
        if value is not None:
            monkeypatch.setenv(var, value)
    tree = cli_tree()
    ctx = cmd.make_context(path[-1], to_host(rest, service), parent=tree[path[:-1]][1])
    return path, ctx


# -- tests -----------------------------------------------------------------------------------------
COMPOSE_SETS = {"cpu": (COMPOSE,), "gpu": (COMPOSE, COMPOSE_GPU), "curve": (COMPOSE, COMPOSE_CURVE),
                "gpu-curve": (COMPOSE, COMPOSE_GPU, COMPOSE_CURVE)}


@pytest.fixture(params=list(COMPOSE_SETS))
def compose(request):
    return request.param, load_compose(*COMPOSE_SETS[request.param])


def test_compose_commands_ports_and_environment_agree_with_the_cli(compose, monkeypatch):
    kind, data = compose
    services = data["services"]
    assert set(services) >= {"server", "worker"}
    server, worker = services["server"], services["worker"]

    spath, sctx = parse_service(server, "server", monkeypatch)
    assert spath == ("server",)
    wpath, wctx = parse_service(worker, "worker", monkeypatch)
    assert wpath == ("worker",)

    # The run: command line, environment and the mounted run.toml build a valid configuration.
    config, metrics = build_config(sctx.params, sctx.params["workers"])
    metrics = getattr(metrics, "metrics", metrics)  # the metrics path, or an outputs record holding it
    RunSetup.build(config)
    replicas = int(worker.get("deploy", {}).get("replicas", 1))
    assert config.workers == replicas, "the server must wait for as many workers as the compose file starts"
    # ... and its metrics land in a writable mounted folder.
    raw_metrics = server["command"][server["command"].index("--metrics") + 1]
    assert any(raw_metrics.startswith(dst.rstrip("/") + "/") and rw for _, dst, rw in volumes(server)), raw_metrics
    assert metrics and Path(metrics).parent == next(src for src, dst, _ in volumes(server) if raw_metrics.startswith(dst))

    # Ports: the server binds what it publishes and what the worker connects to; the health checks
    # probe that port.
    host, port = endpoint_port(sctx.params["bind"])
    assert host in ("0.0.0.0", "*"), "in a container the server must bind every interface"
    assert port in container_ports(server)
    assert re.search(rf"^EXPOSE\s+.*\b{port}\b", DOCKERFILE.read_text(), re.M)
    whost, wport = endpoint_port(wctx.params["connect"])
    assert whost == "server" and wport == port
    assert f"{port})" in " ".join(server["healthcheck"]["test"])
    assert f":{port:04X}" in " ".join(worker["healthcheck"]["test"])
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    assert wctx.params["join_timeout"] >= 60, "workers must wait long enough for the server"

    if kind.startswith("gpu"):
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices)
        assert wctx.params["device"] == "auto" or wctx.params["device"].startswith("cuda")


def test_worker_count_has_one_source():
    """WORKERS drives the server's count, the number of worker containers and the workers' own
    scale check; both services count the containers of the worker service."""
    data = load_compose(COMPOSE, env={"WORKERS": "5"})
    server, worker = data["services"]["server"], data["services"]["worker"]
    assert environment(server)["PSC_SERVER_WORKERS"] == "5"
    assert int(worker["deploy"]["replicas"]) == 5
    assert environment(worker)["SCALE_CHECK_WORKERS"] == "5"
    assert environment(server)["SCALE_CHECK_SERVICE"] == environment(worker)["SCALE_CHECK_SERVICE"] == "worker"
    assert "worker" in data["services"]


def test_dockerfile_builds_what_compose_asks_for():
    text = DOCKERFILE.read_text()
    args = set(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.M))
    assert {"BASE", "TORCH", "TORCH_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "CA_BUNDLE"} <= args
    # Two stages on one base; tini is PID 1 and hands signals to the entrypoint, which hands them to psc.
    assert len(re.findall(r"^FROM\s+\$\{BASE\}", text, re.M)) == 2
    assert re.search(r'^ENTRYPOINT\s+\["/usr/bin/tini", "--", "/opt/venv/bin/python", "/opt/psc/entrypoint.py"\]', text, re.M)
    assert re.search(r"^COPY \. /src$", text, re.M) and "deploy/entrypoint.py" in text
    # The build context (BuildKit filters it with Dockerfile.dockerignore) lets through every package
    # that pyproject.toml installs, the entrypoint and the CA folder.
    with open(ROOT / "pyproject.toml", "rb") as fh:
        include = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]["include"]
    allowed = {line[1:].strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
    for pattern in include:
        assert f"{pattern.rstrip('*')}/**" in allowed, f"deploy/Dockerfile.dockerignore does not let {pattern.rstrip('*')}/ through"
    assert {"pyproject.toml", "README.md", "deploy/entrypoint.py", "deploy/certs/**"} <= allowed
    assert (DEPLOY / "certs").is_dir()
    for f in (COMPOSE, COMPOSE_GPU, COMPOSE_CURVE):
        for name, service in load_compose(f).get("services", {}).items():
            build = service.get("build")
            if not build:
                continue
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
            assert set(build.get("args", {})) <= args, f"{f.name} {name}: build args the Dockerfile does not declare"


def test_run_toml_holds_only_run_options():
    data = read_toml(str(DEPLOY / "run.toml"))  # raises a usage error on an unknown key
    assert "workers" not in data, "the worker count comes from $WORKERS in the compose file"


def code_lines(text: str) -> list[str]:
    """The lines of fenced and indented code blocks, with backslash continuations joined."""
    lines, fenced, out = text.splitlines(), False, []
    for line in lines:
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            out.append(line.strip())
    joined, buf = [], ""
    for line in out:
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    return joined


def psc_invocations(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """The `psc ...` (or `python -m psc ...`) commands of one shell line, with their VAR=value prefixes."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    found, i = [], 0
    while i < len(tokens):
        env = {}
        while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]):
            k, v = tokens[i].split("=", 1)
            env[k] = v
            i += 1
        start = None
        if i < len(tokens) and (tokens[i] == "psc" or tokens[i].endswith("/psc")):
            start = i + 1
        elif i + 2 < len(tokens) and tokens[i + 1:i + 3] == ["-m", "psc"]:
            start = i + 3
        j = start if start is not None else i + 1
        while j < len(tokens) and tokens[j] not in ("&&", "||", "|", ";", "&"):
            j += 1
        if start is not None:
            found.append((env, tokens[start:j]))
        i = j + 1
    return found


def test_docs_deploy_commands_agree_with_the_cli():
    known = cli_env_vars()
    checked = 0
    for line in code_lines(DOCS.read_text()):
        for var in re.findall(r"\b(PSC_[A-Z0-9_]+)=", line):
            assert var in known, f"docs/deploy.md: {var} is read by no psc option: {line}"
        for _env, args in psc_invocations(line):
            if args:
                check_psc_args(args, f"docs/deploy.md: {line}")
                checked += 1
    assert checked >= 5, "docs/deploy.md should show the psc commands it explains"


def compose_client() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.mark.parametrize("files", list(COMPOSE_SETS.values()), ids=list(COMPOSE_SETS))
def test_docker_compose_config_validates(files, tmp_path):
    client = compose_client()
    if client is None:
        pytest.skip("no docker client that runs `docker compose config` (or docker-compose)")
    args = [a for f in files for a in ("-f", str(f))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSC_") and not k.startswith("CURVE_")}
    for side in ("server", "worker"):  # `config` may check that bind sources exist
        (tmp_path / side).mkdir()
    env["CURVE_KEYS"] = str(tmp_path)
    r = subprocess.run([*client, *args, "config", "-q"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"{' '.join(client)} config: {r.stderr}"


def host_keys(tmp_path: Path, n: int) -> tuple[Path, Path, Path]:
    """A server pair, a worker host's --key-dir (n worker pairs and the server's public key) and the
    server's allow folder (those n public keys)."""
    from runtime.transport import keygen

    keys, host, allowed = tmp_path / "keys", tmp_path / "host1", tmp_path / "allowed"
    keygen(str(keys), "server")
    allowed.mkdir()
    for j in range(n):
        keygen(str(host), f"host1-{j}")
        shutil.copy(host / f"host1-{j}.key", allowed)
    shutil.copy(keys / "server.key", host)
    return keys / "server.key_secret", host, allowed


@pytest.mark.procs
def test_multi_gpu_launcher_joins_a_remote_server_and_the_healthcheck_sees_it(tmp_path):
    """deploy/launch_multi_gpu.sh --connect starts this host's workers against a server elsewhere
    (here: on loopback), with CURVE and an allow list: --key-dir gives each worker its own key; the
    compose file's server health check succeeds on a listening server."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    server_key, key_dir, allowed = host_keys(tmp_path, 2)
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "2", "--rounds", "5",
                    "--problem", "quadratic:d=20", "--metrics", str(metrics), "--timeout", "30", "--join-timeout", "90",
                    "--server-key", str(server_key), "--allow", str(allowed)])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PSC_")}, "PYTHON": sys.executable}
    launcher = None
    try:
        probe = load_compose(COMPOSE)["services"]["server"]["healthcheck"]["test"]
        assert probe[0] == "CMD" and probe[1] == "python"
        code = [a.replace("5555", str(port)) for a in probe[2:]]
        for _ in range(100):  # the server binds after building its problem: at most ~10 s here
            if subprocess.run([sys.executable, *code], capture_output=True, timeout=10).returncode == 0:
                break
            assert server.poll() is None, server.communicate()[1][-2000:]
            time.sleep(0.1)
        else:
            raise AssertionError("the server health check never succeeded")
        launcher = subprocess.Popen(["bash", str(DEPLOY / "launch_multi_gpu.sh"), "--connect", f"tcp://127.0.0.1:{port}",
                                     "--workers", "2", "--rank-offset", "0", "--key-dir", str(key_dir), "--", "--timeout", "30"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        code, _, err = finish(server, 120)
        assert code == 0, err[-2000:]
        lcode, _, lerr = finish(launcher, 60)
        assert lcode == 0, lerr[-2000:]
    finally:
        if launcher is not None and launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # the script and the workers it started
        kill_all([p for p in (server, launcher) if p is not None])
    assert "worker 0 joined" in err and "worker 1 joined" in err
    got = records(str(metrics))
    assert got[-1]["event"] == "end" and got[-1]["ok"] is True
    assert sum(r["event"] == "round" for r in got) == 5
    assert "refused" not in err, err[-2000:]  # both keys were admitted: one identity per worker


def test_multi_gpu_launcher_key_dir_needs_a_key_per_worker(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    _, key_dir, _ = host_keys(tmp_path, 1)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PSC_")}, "PYTHON": sys.executable}
    run = lambda *a: subprocess.run(["bash", str(DEPLOY / "launch_multi_gpu.sh"), *a], capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=120)
    r = run("--connect", "tcp://127.0.0.1:1", "--workers", "2", "--key-dir", str(key_dir))
    assert r.returncode == 2 and "1 secret key file(s) (*.key_secret) for 2 workers" in r.stderr, r.stderr
    (key_dir / "server.key").unlink()
    r = run("--connect", "tcp://127.0.0.1:1", "--workers", "1", "--key-dir", str(key_dir))
    assert r.returncode == 2 and "no server.key" in r.stderr, r.stderr
    r = run("--workers", "1", "--key-dir", str(key_dir))
    assert r.returncode == 2 and "--key-dir is for --connect" in r.stderr, r.stderr


# -- deploy/entrypoint.py: the container's entrypoint ------------------------------------------------
def load_entrypoint():
    import importlib.util

    spec = importlib.util.spec_from_file_location("psc_deploy_entrypoint", DEPLOY / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, dt):
        self.t += dt


def run_check(counts, expected, settle=10.0, steps=200):
    """check_scale against a scripted sequence of container counts (the last one repeats)."""
    ep = load_entrypoint()
    clock, seq, calls = FakeClock(), list(counts), []

    def count():
        calls.append(1)
        return seq.pop(0) if len(seq) > 1 else seq[0]

    return ep.check_scale(expected, count, "worker", "the server", settle=settle, poll=0.5,
                          alive=lambda: len(calls) < steps, clock=clock, sleep=clock.sleep, emit=lambda _: None)


def test_scale_check_names_both_numbers_on_a_surplus():
    msg = run_check([0, 0, 1, 3], expected=2)
    assert msg is not None and "3 containers of service 'worker'" in msg and "waits for 2 workers" in msg
    assert "--scale worker=3" in msg and "WORKERS=2" in msg


def test_scale_check_names_both_numbers_when_fewer_settle():
    msg = run_check([0, 1, 2], expected=3, settle=5.0)
    assert msg is not None and "2 containers of service 'worker'" in msg and "waits for 3 workers" in msg


def test_scale_check_accepts_the_configured_count_and_no_containers():
    assert run_check([0, 1, 2, 3], expected=3) is None  # equal for `settle` seconds: done
    assert run_check([0], expected=3) is None  # no worker containers: workers elsewhere; never an error
    # Workers that finish after the count was right are no mismatch.
    assert run_check([3, 3, 1, 0], expected=3, settle=100.0, steps=50) is None


def test_entrypoint_reads_psc_settings_as_psc_does(tmp_path):
    ep = load_entrypoint()
    assert ep.split_command(["--debug", "server", "--workers", "3"]) == ("server", ["--workers", "3"])
    assert ep.split_command(["--help"]) == (None, [])
    conf = tmp_path / "run.toml"
    conf.write_text('workers = 7\nmetrics = "/runs/x.jsonl"\n')
    env = {"PSC_SERVER_WORKERS": "5", "PSC_SERVER_CONFIG": str(conf)}
    assert ep.setting("server", ["--workers=4"], "workers", env) == "4"
    assert ep.setting("server", [], "workers", env) == "5"
    assert ep.setting("server", [], "workers", {**env, "PSC_SERVER_WORKERS": ""}) == "7"
    assert ep.setting("server", ["--metrics", "m.jsonl"], "metrics", env) == "m.jsonl"
    assert ep.setting("server", [], "metrics", env) == "/runs/x.jsonl"


def entrypoint(args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("PSC_") and not k.startswith("SCALE_CHECK")}
    return subprocess.Popen([sys.executable, str(DEPLOY / "entrypoint.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**base, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.mark.procs
def test_entrypoint_stops_a_server_whose_worker_count_disagrees_with_the_containers(tmp_path):
    """A real server started by the entrypoint, as in the compose file: the worker service name
    resolves to one address (here `localhost`, one container), the server waits for 2: the run
    fails at once, exit 1, with a message naming both numbers (not after --join-timeout)."""
    port = free_port()
    t0 = time.monotonic()
    proc = entrypoint(["server", "--bind", f"tcp://127.0.0.1:{port}", "--rounds", "5", "--problem", "quadratic:d=20",
                       "--metrics", str(tmp_path / "run.jsonl"), "--join-timeout", "120"],
                      {"PSC_SERVER_WORKERS": "2", "SCALE_CHECK_SERVICE": "localhost", "SCALE_CHECK_SETTLE": "2"})
    code, _, err = finish(proc, 60)
    assert code == 1, err[-2000:]
    assert time.monotonic() - t0 < 50
    assert "compose runs 1 container of service 'localhost'" in err and "waits for 2 workers" in err, err[-2000:]


@pytest.mark.procs
def test_entrypoint_runs_psc_with_progress_lines_and_summary_and_passes_sigterm(tmp_path):
    """The agreeing case runs to the end, and the log (stderr, not a terminal) holds psc's progress
    lines and its summary; a SIGTERM to the entrypoint reaches psc (the entrypoint then exits with
    psc's status)."""
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    server = entrypoint(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--rounds", "20",
                         "--problem", "quadratic:d=20", "--metrics", str(metrics), "--timeout", "30"],
                        {"SCALE_CHECK_SERVICE": "localhost", "SCALE_CHECK_SETTLE": "1"})
    worker = start(["worker", "--connect", f"tcp://127.0.0.1:{port}", "--timeout", "30"])
    try:
        code, _, err = finish(server, 120)
        assert code == 0, err[-2000:]
        assert finish(worker, 60)[0] == 0
    finally:
        kill_all([server, worker])
    assert "1 container of service 'localhost', as the server expects" in err
    assert re.search(r"round 20/20\b", err), err[-2000:]
    assert "summary" in err, err[-2000:]
    assert records(str(metrics))[-1]["ok"] is True

    port = free_port()
    server = entrypoint(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "2", "--rounds", "5",
                         "--problem", "quadratic:d=20", "--metrics", str(tmp_path / "stop.jsonl")])
    try:
        probe = load_compose(COMPOSE)["services"]["server"]["healthcheck"]["test"][2:]
        code = [a.replace("5555", str(port)) for a in probe]
        for _ in range(150):  # listening: psc has started and installed its handlers
            if subprocess.run([sys.executable, *code], capture_output=True, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        code, _, err = finish(server, 30)
    finally:
        kill_all([server])
    assert code == 128 + signal.SIGTERM, err[-2000:]


# -- CurveZMQ in compose: key files mounted from the host, or key material in variables ---------------
def make_compose_keys(root: Path) -> Path:
    """The layout of docs/deploy.md: CURVE_KEYS/server (the server's pair) and CURVE_KEYS/worker (the
    workers' pair and the server's public key)."""
    from runtime.transport import keygen

    keygen(str(root / "server"), "server")
    keygen(str(root / "worker"), "worker")
    shutil.copy(root / "server" / "server.key", root / "worker" / "server.key")
    return root


def host_env(service: dict) -> dict[str, str]:
    """The service's environment (set values only), with container paths rewritten to the host."""
    return {k: to_host([v], service)[0] for k, v in environment(service).items() if v}


def visible_files(service: dict) -> set[str]:
    """The names of the files a service's bind mounts show it."""
    names = set()
    for src, _dst, _rw in volumes(service):
        if src.is_dir():
            names |= {p.name for p in src.rglob("*") if p.is_file()}
        elif src.is_file():
            names.add(src.name)
    return names


def test_curve_compose_gives_each_side_only_its_keys_and_they_load(tmp_path, monkeypatch):
    from runtime.transport import ServerKeys, WorkerKeys

    ep = load_entrypoint()
    keys = make_compose_keys(tmp_path / "keys")
    data = load_compose(COMPOSE, COMPOSE_CURVE, env={"CURVE_KEYS": str(keys)})
    server, worker = data["services"]["server"], data["services"]["worker"]
    # The base file's mounts survive the override's; the keys are mounted read-only.
    assert {dst for _, dst, _ in volumes(server)} == {"/config/run.toml", "/runs", "/keys"}
    for service in (server, worker):
        assert [rw for src, _, rw in volumes(service) if str(src).startswith(str(keys))] == [False]
    # Each side sees its own secret key only.
    assert visible_files(server) >= {"server.key_secret"} and "worker.key_secret" not in visible_files(server)
    assert {"worker.key_secret", "server.key"} <= visible_files(worker) and "server.key_secret" not in visible_files(worker)
    # The paths the override names are the mounted files; the entrypoint accepts them and psc loads them.
    senv, wenv = host_env(server), host_env(worker)
    assert ep.curve_setup("server", [], senv) == ([], None)
    assert ep.curve_setup("worker", [], wenv) == ([], None)
    skeys = ServerKeys.load(senv["PSC_SERVER_SERVER_KEY"])
    wkeys = WorkerKeys.load(wenv["PSC_WORKER_KEY"], wenv["PSC_WORKER_SERVER_PUBLIC"])
    assert wkeys.server_public == skeys.public
    # With the allow list of docs/deploy.md (CURVE_KEYS/server/allowed, PSC_SERVER_ALLOW_DIR=/keys/allowed).
    (keys / "server" / "allowed").mkdir()
    shutil.copy(keys / "worker" / "worker.key", keys / "server" / "allowed" / "worker.key")
    allow = to_host(["/keys/allowed"], server)[0]
    assert ep.curve_setup("server", [], {**senv, "PSC_SERVER_ALLOW_DIR": allow}) == ([], None)
    assert ServerKeys.load(senv["PSC_SERVER_SERVER_KEY"], allow).allow_dir == allow
    # The default folder, deploy/keys, is ignored by git and kept out of the image's build context.
    default = load_compose(COMPOSE, COMPOSE_CURVE)["services"]["server"]
    assert any(src == DEPLOY / "keys" / "server" for src, _, _ in volumes(default))
    ignore = (DEPLOY / "keys" / ".gitignore").read_text().splitlines()
    assert "*" in ignore
    allowed = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")]
    assert not any(line.startswith(("!deploy/keys", "!deploy/**", "!**")) for line in allowed)


def test_plain_compose_has_no_keys_and_the_entrypoint_adds_nothing():
    ep = load_entrypoint()
    for files in (COMPOSE_SETS["cpu"], COMPOSE_SETS["gpu"]):
        data = load_compose(*files)
        for name in ("server", "worker"):
            env = {k: v for k, v in environment(data["services"][name]).items() if v is not None}
            assert not any(env.get(k) for k in ("PSC_SERVER_SERVER_KEY", "PSC_WORKER_KEY", *ep.KEY_VARIABLES))
            assert ep.curve_setup(name, data["services"][name]["command"][1:], env) == ([], None)
    assert ep.curve_setup("list", ["algorithms"], {"CURVE_SECRET_KEY": "junk"}) == ([], None)


def test_entrypoint_writes_keys_from_variables_to_private_files(tmp_path):
    import stat
    import zmq
    import zmq.auth
    from runtime.transport import ServerKeys, WorkerKeys, keygen

    ep = load_entrypoint()
    spub, ssec = zmq.curve_keypair()
    w1, w2 = zmq.curve_keypair()[0], zmq.curve_keypair()[0]
    env = {"CURVE_SECRET_KEY": ssec.decode(), "CURVE_ALLOW_KEYS": f" {w1.decode()},\n{w2.decode()} "}
    extra, folder = ep.curve_setup("server", ["--bind", "tcp://0.0.0.0:5555"], env, tmpdir=str(tmp_path))
    assert extra[0::2] == ["--server-key", "--allow"]
    key, allow = extra[1], extra[3]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    loaded = ServerKeys.load(key, allow)
    assert (loaded.public, loaded.secret) == (spub, ssec)  # the public key derived from the secret
    assert set(zmq.auth.load_certificates(allow)) == {w1, w2}

    # A worker from the text of psc keygen's files (e.g. CURVE_WORKER_SECRET="$(cat worker.key_secret)").
    pub_file, sec_file = keygen(str(tmp_path / "k"), "worker")
    env = {"CURVE_SECRET_KEY": Path(sec_file).read_text(), "CURVE_SERVER_PUBLIC": spub.decode()}
    extra, folder = ep.curve_setup("worker", ["--connect", "tcp://server:5555"], env, tmpdir=str(tmp_path))
    assert extra[0::2] == ["--key", "--server-public"]
    wkeys = WorkerKeys.load(extra[1], extra[3])
    assert (wkeys.public, wkeys.server_public) == (zmq.auth.load_certificate(pub_file)[0], spub)
    assert all(stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) == 0o600 for f in os.listdir(folder))


@pytest.fixture
def key_files(tmp_path):
    keys = make_compose_keys(tmp_path / "keys")
    bad = tmp_path / "bad.key_secret"
    bad.write_text("this is not a key file\n")
    (tmp_path / "empty").mkdir()
    return keys, bad, tmp_path


SECRET = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a well-formed secret key that must never be printed


@pytest.mark.parametrize("case", [
    "missing", "folder", "public-as-secret", "garbage", "bad-variable", "short-variable", "both", "worker-half",
    "worker-other-half", "empty-allow", "allow-alone", "public-on-server", "allow-on-worker"])
def test_entrypoint_key_errors_are_one_line_and_never_show_a_key(case, key_files, capsys):
    ep = load_entrypoint()
    keys, bad, tmp = key_files
    wsec, spub = str(keys / "worker" / "worker.key_secret"), str(keys / "worker" / "server.key")
    command, args, env, expect = {
        "missing": ("server", ["--server-key", "/keys/server.key_secret"], {}, "--server-key /keys/server.key_secret: no such file"),
        "folder": ("worker", [], {"PSC_WORKER_KEY": str(tmp / "empty"), "PSC_WORKER_SERVER_PUBLIC": spub}, "a folder, not a key file"),
        "public-as-secret": ("worker", ["--key", str(keys / "worker" / "worker.key"), "--server-public", spub], {},
                             "holds no secret key: give the NAME.key_secret file"),
        "garbage": ("server", ["--server-key", str(bad)], {}, "holds no secret key"),
        "bad-variable": ("server", [], {"CURVE_SECRET_KEY": SECRET[:-1] + "~"}, "CURVE_SECRET_KEY: not a CurveZMQ secret key"),
        "short-variable": ("worker", [], {"CURVE_SECRET_KEY": SECRET[:39], "CURVE_SERVER_PUBLIC": SECRET},
                           "CURVE_SECRET_KEY: not a CurveZMQ secret key"),
        "both": ("worker", ["--key", wsec, "--server-public", spub], {"CURVE_SECRET_KEY": SECRET}, "both --key"),
        "worker-half": ("worker", [], {"CURVE_SECRET_KEY": SECRET}, "not the server's public key"),
        "worker-other-half": ("worker", ["--server-public", spub], {}, "no secret key of its own"),
        "empty-allow": ("server", ["--server-key", str(keys / "server" / "server.key_secret"), "--allow", str(tmp / "empty")], {},
                        "holds no public key (*.key) files"),
        "allow-alone": ("server", [], {"PSC_SERVER_ALLOW_DIR": str(keys / "worker")}, "needs the server's secret key"),
        "public-on-server": ("server", [], {"CURVE_SECRET_KEY": SECRET, "CURVE_SERVER_PUBLIC": SECRET}, "is for workers"),
        "allow-on-worker": ("worker", [], {"CURVE_ALLOW_KEYS": SECRET}, "is for the server"),
    }[case]
    with pytest.raises(ep.KeySetupError) as info:
        ep.curve_setup(command, args, env, tmpdir=str(tmp))
    msg = str(info.value)
    assert expect in msg and "\n" not in msg, msg
    assert SECRET[:20] not in msg and Path(wsec).read_text().split('secret-key = "')[1][:20] not in msg

    # main() says it in one line, exit 2, before psc starts (no exec: this test process goes on).
    saved = dict(os.environ)
    try:
        for k in [k for k in os.environ if k.startswith(("PSC_", "CURVE_", "SCALE_CHECK"))]:
            del os.environ[k]
        os.environ.update(env)
        assert ep.main([command, *args]) == 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("psc entrypoint: error: ") and expect in err, err


@pytest.mark.procs
def test_entrypoint_runs_a_curve_run_from_keys_in_variables(tmp_path):
    """Server and worker started by the entrypoint, keys only in CURVE_* variables (no files of the
    user's): the run ends ok, so both sides had CURVE on (a CURVE worker cannot talk to a plain
    server), the allow list admitted the worker, and no key reached the logs."""
    import zmq

    spub, ssec = zmq.curve_keypair()
    wpub, wsec = zmq.curve_keypair()
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    server = entrypoint(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--rounds", "5",
                         "--problem", "quadratic:d=20", "--metrics", str(metrics), "--timeout", "30", "--join-timeout", "90"],
                        {"CURVE_SECRET_KEY": ssec.decode(), "CURVE_ALLOW_KEYS": wpub.decode(), "TMPDIR": str(tmp_path)})
    worker = entrypoint(["worker", "--connect", f"tcp://127.0.0.1:{port}", "--timeout", "30", "--join-timeout", "90"],
                        {"CURVE_SECRET_KEY": wsec.decode(), "CURVE_SERVER_PUBLIC": spub.decode(), "TMPDIR": str(tmp_path)})
    try:
        code, out, err = finish(server, 150)
        assert code == 0, err[-2000:]
        wcode, wout, werr = finish(worker, 60)
        assert wcode == 0, werr[-2000:]
    finally:
        kill_all([server, worker])
    assert records(str(metrics))[-1]["ok"] is True
    for text in (out, err, wout, werr):
        assert ssec.decode() not in text and wsec.decode() not in text


def test_smoke_script_is_valid_bash_and_says_when_it_cannot_run(tmp_path):
    """deploy/smoke.sh parses, and exits 77 (not 1) where no Docker engine can run."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    smoke = DEPLOY / "smoke.sh"
    assert subprocess.run(["bash", "-n", str(smoke)], capture_output=True).returncode == 0
    assert os.access(smoke, os.X_OK)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\nexit 1\n")  # a client that reaches no engine
    (fake / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "DOCKERD": "none", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(smoke)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 77, r.stdout + r.stderr
    assert "CANNOT RUN" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["bin"], "smoke.sh left its temporary folder"


@pytest.mark.skipif(os.environ.get("DOCKER_SMOKE") != "1", reason="the Docker smoke test runs on demand: DOCKER_SMOKE=1")
def test_docker_smoke():
    """deploy/smoke.sh end to end (minutes; builds the image): DOCKER_SMOKE=1 python -m pytest tests/test_deploy.py -k smoke."""
    r = subprocess.run(["bash", str(DEPLOY / "smoke.sh")], timeout=3600)
    if r.returncode == 77:
        pytest.skip("no Docker engine can run here (deploy/smoke.sh exited 77)")
    assert r.returncode == 0
