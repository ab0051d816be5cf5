#!/usr/bin/env bash
# deploy/smoke.sh: build the image and run a compose cluster end to end (docs/deploy.md, "Smoke test").
#
#   deploy/smoke.sh            # from anywhere in the repository; takes a few minutes
#
# 1. A Docker engine: the running one (`docker info`), or, when none answers and dockerd is installed
#    and this is root, a private dockerd (own socket, data root and exec root in a temporary folder)
#    that is stopped again by its PID.
# 2. The base image: BASE_IMAGE (python:3.11-slim) if present or pullable; otherwise a Debian base is
#    made with debootstrap from this host's apt mirror (minbase, imported as psc-smoke-base:SUITE).
# 3. The image, built from the repository's files (git ls-files: no virtual environments, no runs),
#    with pip set up as on this host: its index, extra indexes, find-links and CA bundle (`pip config
#    list`, PIP_* variables); local folders among them are served on 127.0.0.1 for the build, which
#    runs with --network host. Its size is reported.
# 4. WORKERS=3 compose up --scale worker=3 with the compose client (COMPOSE, else `docker compose`, else
#    `docker-compose`): the metrics file's end line must say ok, every worker must have sent bytes,
#    every container must exit 0, the server's log must hold progress lines and the run summary.
#    Then the same with CurveZMQ (docker-compose.curve.yml): keys made with `psc keygen` in the image,
#    WORKERS=2, the run must end ok (a worker holding keys cannot talk to a server without CURVE) and
#    no secret key may appear in the logs.
# 5. The scale check: WORKERS=2 with --scale worker=3 must fail, naming both numbers.
# 6. docker stop: a long run's server must exit 143 (SIGTERM reached psc) well before the stop timeout.
# Then everything it made is removed: containers, networks, images, the temporary folder, the local
# pip server and the dockerd it started.
#
# Variables: BASE_IMAGE, COMPOSE (e.g. "docker-compose"), WORKERS (3), TORCH_INDEX (default: empty,
# i.e. torch as this host's pip finds it, when this host's pip has an index setting; else the
# Dockerfile's), BUILD_NETWORK (host), SMOKE_TIMEOUT (600 s per cluster run), SMOKE_KEEP=1 (keep the
# images), SMOKE_IMAGE (test this image instead of building one), SMOKE_CURVE=0 / SMOKE_MISMATCH=0 /
# SMOKE_STOP=0 (skip the CURVE run / steps 5 / 6), DEBIAN_MIRROR, DEBIAN_SUITE, DOCKERD (the dockerd to start; none: never start one).
#
# Exit status: 0 passed; 1 a check failed (the reason is printed); 2 a usage error; 77 no Docker
# engine or no compose client or no base image can be had here (nothing was checked).
set -euo pipefail

usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
case "${1:-}" in -h|--help) usage 0 ;; "") ;; *) echo "smoke.sh: no arguments expected (see --help)" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
WORKERS=${WORKERS:-3}
BUILD_NETWORK=${BUILD_NETWORK:-host}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-600}
TAG="psc-smoke:$$"
PROJECT="pscsmoke$$"
T0=$(date +%s)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/psc-smoke.XXXXXX")
DOCKERD_PID="" PIPSERVE_PID="" MADE_BASE="" IMAGES_BEFORE="" COMPOSE_PROJECTS=() EXTRA_ENV=()
declare -a COMPOSE_CMD=()

log() { printf '[smoke %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
cannot() { log "CANNOT RUN: $*"; exit 77; }

cleanup() {
  local code=$?
  set +e
  trap - EXIT INT TERM
  log "cleaning up"
  if [[ ${#COMPOSE_CMD[@]} -gt 0 ]]; then
    for p in "${COMPOSE_PROJECTS[@]}"; do
      compose_env "$p" 2 "${COMPOSE_CMD[@]}" -p "$p" -f "$ROOT/deploy/docker-compose.yml" down -v --remove-orphans -t 5 > /dev/null 2>&1
    done
  fi
  if [[ -n "$IMAGES_BEFORE" && -z "${SMOKE_KEEP:-}" ]]; then
    [[ -z "${SMOKE_IMAGE:-}" ]] && docker rmi -f "$TAG" > /dev/null 2>&1
    [[ -n "$MADE_BASE" ]] && docker rmi -f "$MADE_BASE" > /dev/null 2>&1
    # intermediate images of the classic builder's build stage
    comm -13 <(echo "$IMAGES_BEFORE") <(docker images -aq --no-trunc | sort -u) | xargs -r docker rmi -f > /dev/null 2>&1
  fi
  [[ -n "$PIPSERVE_PID" ]] && kill "$PIPSERVE_PID" 2> /dev/null
  if [[ -n "$DOCKERD_PID" ]]; then
    log "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2> /dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2> /dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2> /dev/null && kill -KILL "$DOCKERD_PID"
    # overlay mounts of the private data root, should any be left
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2> /dev/null
  fi
  rm -rf "$WORK"
  log "total $(( $(date +%s) - T0 )) s, exit $code"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- 1. the engine ----------------------------------------------------------------------------------
command -v docker > /dev/null || cannot "no docker client (Debian/Ubuntu: apt-get install docker.io)"
if docker info > /dev/null 2>&1; then
  log "using the running Docker engine ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
else
  if [[ -z "${DOCKERD:-}" ]]; then
    DOCKERD=$(command -v dockerd || true)
    [[ -z "$DOCKERD" && -x /usr/sbin/dockerd ]] && DOCKERD=/usr/sbin/dockerd
  fi
  [[ -n "$DOCKERD" && "$DOCKERD" != none ]] || cannot "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
  [[ $(id -u) -eq 0 ]] || cannot "no Docker engine answers, and starting dockerd needs root"
  mkdir -p "$WORK/docker/data" "$WORK/docker/exec"
  "$DOCKERD" --host "unix://$WORK/docker/docker.sock" --data-root "$WORK/docker/data" \
    --exec-root "$WORK/docker/exec" --pidfile "$WORK/docker/dockerd.pid" > "$WORK/docker/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  export DOCKER_HOST="unix://$WORK/docker/docker.sock"
  for _ in $(seq 120); do
    docker info > /dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2> /dev/null || break
    sleep 0.5
  done
  if ! docker info > /dev/null 2>&1; then
    tail -n 20 "$WORK/docker/dockerd.log" >&2
    cannot "dockerd ($DOCKERD) did not start here"
  fi
  log "started dockerd $(docker version -f '{{.Server.Version}}') as pid $DOCKERD_PID (private data root)"
fi
IMAGES_BEFORE=$(docker images -aq --no-trunc | sort -u; echo)

if [[ -n "${COMPOSE:-}" ]]; then
  read -r -a COMPOSE_CMD <<< "$COMPOSE"
elif docker compose version > /dev/null 2>&1; then
  COMPOSE_CMD=(docker compose)
elif command -v docker-compose > /dev/null; then
  COMPOSE_CMD=(docker-compose)
else
  cannot "no compose client: apt-get install docker-compose (v1) or the Compose v2 plugin"
fi
log "compose client: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version 2>/dev/null | head -n1))"

# -- 2. the base image --------------------------------------------------------------------------------
BASE="$BASE_IMAGE"
if docker image inspect "$BASE" > /dev/null 2>&1; then
  log "base image $BASE (present)"
elif timeout 300 docker pull -q "$BASE" > /dev/null 2>&1; then
  log "base image $BASE (pulled)"
else
  command -v debootstrap > /dev/null || cannot "cannot pull $BASE and debootstrap is not installed to make a Debian base (apt-get install debootstrap, or set BASE_IMAGE to a local image)"
  [[ $(id -u) -eq 0 ]] || cannot "cannot pull $BASE, and debootstrap needs root"
  if [[ -z "${DEBIAN_MIRROR:-}" ]]; then
    DEBIAN_MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2> /dev/null \
      | grep -v '^\s*#' | grep -oE 'https?://[^ ]*(debian|ubuntu)[^ ]*' | grep -v -- '-security' | head -n1 || true)
    DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  fi
  if [[ -z "${DEBIAN_SUITE:-}" ]]; then
    DEBIAN_SUITE=$( . /etc/os-release 2> /dev/null; echo "${VERSION_CODENAME:-}")
    DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
  fi
  log "cannot pull $BASE: making a $DEBIAN_SUITE base with debootstrap from $DEBIAN_MIRROR"
  t=$(date +%s)
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$WORK/rootfs" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; cannot "debootstrap failed"; }
  rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*
  MADE_BASE="psc-smoke-base:$DEBIAN_SUITE-$$"
  tar -C "$WORK/rootfs" -c . | docker import - "$MADE_BASE" > /dev/null
  rm -rf "$WORK/rootfs"
  BASE="$MADE_BASE"
  log "base image $BASE made in $(( $(date +%s) - t )) s ($(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

# -- 3. the image -------------------------------------------------------------------------------------
# pip as on this host: PIP_* variables first, then `pip config list` (env, install, global).
PIPCONF=$( (python3 -m pip config list || pip config list) 2> /dev/null || true)
pip_setting() {  # pip_setting KEY -> the value pip on this host would use, or nothing
  local key=$1 var="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [[ -n "${!var:-}" ]]; then echo "${!var}"; return; fi
  local scope
  for scope in ":env:" "install" "global"; do
    local line
    line=$(grep -F "$scope.$key=" <<< "$PIPCONF" | head -n1 || true)
    if [[ -n "$line" ]]; then line=${line#*=}; line=${line#\'}; echo "${line%\'}"; return; fi
  done
}
SERVE="$WORK/pipserve" SERVE_N=0 SERVE_PORT=""
mkdir -p "$SERVE"
SERVED=""
served() {  # served URL-OR-PATH index|links: SERVED=a URL the build can reach (empty: none)
  local item=$1 kind=$2 path=""
  SERVED=""
  case "$item" in
    file://*) path=${item#file://} ;;
    /*) path=$item ;;
    *) SERVED=$item; return ;;
  esac
  [[ -e "$path" ]] || return 0
  if [[ "$BUILD_NETWORK" != host ]]; then log "skipping $item (a local folder; BUILD_NETWORK=$BUILD_NETWORK)"; return 0; fi
  if [[ -z "$SERVE_PORT" ]]; then
    SERVE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  SERVE_N=$((SERVE_N + 1))
  if [[ "$kind" == index ]]; then  # an index's pages link to ../../files: serve its parent
    ln -s "$(dirname "${path%/}")" "$SERVE/$SERVE_N"
    SERVED="http://127.0.0.1:$SERVE_PORT/$SERVE_N/$(basename "${path%/}")/"
  else
    ln -s "${path%/}" "$SERVE/$SERVE_N"
    SERVED="http://127.0.0.1:$SERVE_PORT/$SERVE_N/"
  fi
}
BUILD_ARGS=(--build-arg "BASE=$BASE")
HOST_PIP_INDEX=""
for key in index-url extra-index-url find-links trusted-host; do
  value=$(pip_setting "$key")
  [[ -n "$value" ]] || continue
  HOST_PIP_INDEX=1
  out=()
  for item in $value; do
    if [[ "$key" == trusted-host ]]; then out+=("$item"); continue; fi
    kind=links; [[ "$key" == *index-url ]] && kind=index
    served "$item" "$kind"
    [[ -n "$SERVED" ]] && out+=("$SERVED")
  done
  [[ ${#out[@]} -gt 0 ]] && BUILD_ARGS+=(--build-arg "PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')=${out[*]}")
done
if [[ -n "$SERVE_PORT" ]]; then
  python3 -m http.server --bind 127.0.0.1 --directory "$SERVE" "$SERVE_PORT" > "$WORK/pipserve.log" 2>&1 &
  PIPSERVE_PID=$!
  for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$SERVE_PORT/', timeout=1)" 2> /dev/null && break; sleep 0.1; done
  log "serving this host's local pip folders on 127.0.0.1:$SERVE_PORT for the build (pid $PIPSERVE_PID)"
fi
if [[ -n "${TORCH_INDEX+set}" ]]; then
  BUILD_ARGS+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
elif [[ -n "$HOST_PIP_INDEX" ]]; then
  BUILD_ARGS+=(--build-arg "TORCH_INDEX=")  # torch as pip on this host finds it
fi

# The build context: the repository's files (tracked, or new and not ignored) and the CA bundle.
mkdir -p "$WORK/ctx"
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -C "$WORK/ctx" -xf -)
else
  tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=runs --exclude='*.egg-info' -cf - . | tar -C "$WORK/ctx" -xf -
fi
CA=$(pip_setting cert)
for c in "$CA" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}"; do
  if [[ -n "$c" && -f "$c" ]]; then
    mkdir -p "$WORK/ctx/deploy/certs" && cp "$c" "$WORK/ctx/deploy/certs/smoke-ca.pem"
    BUILD_ARGS+=(--build-arg CA_BUNDLE=deploy/certs/smoke-ca.pem)
    log "pip in the build trusts this host's CA bundle too ($c)"
    break
  fi
done
if [[ -n "${SMOKE_IMAGE:-}" ]]; then
  TAG=$SMOKE_IMAGE
  log "using the image $TAG (SMOKE_IMAGE: not built, not removed)"
  BUILD_S=0
else
log "building $TAG from $BASE (build args: $(printf '%s ' "${BUILD_ARGS[@]}" | sed 's/--build-arg //g'))"
t=$(date +%s)
if ! (cd "$WORK/ctx" && tar -cf - . | docker build --network "$BUILD_NETWORK" -f deploy/Dockerfile "${BUILD_ARGS[@]}" -t "$TAG" -) > "$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  fail "docker build failed"
fi
BUILD_S=$(( $(date +%s) - t ))
fi
rm -rf "$WORK/ctx"
SIZE=$(docker image inspect -f '{{.Size}}' "$TAG")
log "built in ${BUILD_S} s: $(awk -v s="$SIZE" 'BEGIN {printf "%.0f MB (%.2f GB)", s/1e6, s/1e9}')"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" | cut -c1-110 | sed 's/^/    /'
TORCH_VERSION=$(docker run --rm --network none --entrypoint python "$TAG" -c "import torch; print(torch.__version__, 'cuda' if torch.version.cuda else 'cpu')" 2>&1 | tail -n1)
log "torch in the image: $TORCH_VERSION"
if docker run --rm --network none --entrypoint sh "$TAG" -c 'python -m pip --version || command -v gcc cc make' > /dev/null 2>&1; then
  fail "the final image holds pip or build tools"
fi
docker run --rm --network none "$TAG" list algorithms > /dev/null || fail "psc list algorithms failed in the image"

# -- 4. the cluster ---------------------------------------------------------------------------------
compose_env() {  # compose_env PROJECT WORKERS CMD...: run CMD with the compose file's variables set
  local project=$1 workers=$2; shift 2
  env -u PSC_SERVER_ROUNDS -u PSC_SERVER_PROBLEM -u PSC_SERVER_ALLOW_DIR -u CURVE_KEYS -u CURVE_SERVER_SECRET \
    -u CURVE_WORKER_SECRET -u CURVE_SERVER_PUBLIC -u CURVE_ALLOW_KEYS IMAGE="$TAG" WORKERS="$workers" RUNS_DIR="$WORK/runs-$project" \
    RUN_NAME="$project" SERVER_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    PUBLISH_ADDR=127.0.0.1 COMPOSE_PROJECT_NAME="$project" "${EXTRA_ENV[@]}" "$@"
}
EXTRA_ENV=()
containers() { docker ps -aq --filter "label=com.docker.compose.project=$1"; }
wait_exited() {  # wait_exited PROJECT TIMEOUT -> 0 once every container of PROJECT has exited
  local deadline=$(( $(date +%s) + $2 ))
  while (( $(date +%s) < deadline )); do
    local running
    running=$(docker ps -q --filter "label=com.docker.compose.project=$1" | wc -l)
    [[ "$running" -eq 0 && -n "$(containers "$1")" ]] && return 0
    sleep 2
  done
  return 1
}
FILES=(-f "$ROOT/deploy/docker-compose.yml")
cluster() {  # cluster PROJECT WORKERS SCALE: up -d, wait for the end, logs in $WORK/PROJECT.log
  local project=$1 workers=$2 scale=$3
  COMPOSE_PROJECTS+=("$project")
  mkdir -p "$WORK/runs-$project"
  compose_env "$project" "$workers" "${COMPOSE_CMD[@]}" -p "$project" "${FILES[@]}" \
    up -d --no-build --scale "worker=$scale" > "$WORK/$project.up.log" 2>&1 || { cat "$WORK/$project.up.log"; fail "compose up failed"; }
  if ! wait_exited "$project" "$SMOKE_TIMEOUT"; then
    compose_env "$project" "$workers" "${COMPOSE_CMD[@]}" -p "$project" "${FILES[@]}" logs --no-color > "$WORK/$project.log" 2>&1
    tail -n 40 "$WORK/$project.log"
    fail "the cluster did not finish within $SMOKE_TIMEOUT s"
  fi
  compose_env "$project" "$workers" "${COMPOSE_CMD[@]}" -p "$project" "${FILES[@]}" logs --no-color > "$WORK/$project.log" 2>&1
}
exit_codes() {  # NAME EXITCODE per container of PROJECT
  containers "$1" | xargs -r docker inspect -f '{{.Name}} {{.State.ExitCode}}' | sed 's|^/||' | sort
}

log "compose: WORKERS=$WORKERS up --scale worker=$WORKERS (deploy/run.toml: $(grep -E '^(algorithm|problem|rounds)' "$ROOT/deploy/run.toml" | sed 's/ *#.*//' | tr -s ' ' | paste -sd, -))"
t=$(date +%s)
cluster "$PROJECT" "$WORKERS" "$WORKERS"
RUN_S=$(( $(date +%s) - t ))
log "cluster finished in ${RUN_S} s; exit codes:"
exit_codes "$PROJECT" | sed 's/^/    /'
log "the server's log (progress and summary):"
grep -E '^server.*(round [0-9]+/[0-9]+|summary|all [0-9]+ workers ready|entrypoint)' "$WORK/$PROJECT.log" | sed 's/^/    /'
grep -Eq '^server.*round [0-9]+/[0-9]+' "$WORK/$PROJECT.log" || fail "no progress lines in the server's log"
grep -Eq '^server.*run summary' "$WORK/$PROJECT.log" || fail "no summary in the server's log"
bad=$(exit_codes "$PROJECT" | awk '$2 != 0')
[[ -z "$bad" ]] || { tail -n 30 "$WORK/$PROJECT.log"; fail "containers that did not exit 0: $bad"; }
n=$(exit_codes "$PROJECT" | grep -c -- 'worker' || true)
[[ "$n" -eq "$WORKERS" ]] || fail "$n worker containers ran, not $WORKERS"
python3 - "$WORK/runs-$PROJECT/$PROJECT.jsonl" "$WORKERS" << 'EOF' || fail "the metrics file does not show a good run"
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
recs = [json.loads(line) for line in open(path) if line.strip()]
end, rounds = recs[-1], [r for r in recs if r.get("event") == "round"]
assert end.get("event") == "end", f"last line is not the end line: {end}"
assert end.get("ok") is True, f"end line: ok={end.get('ok')}"
assert recs[0].get("workers") == n, f"the run had {recs[0].get('workers')} workers, not {n}"
sent = [sum(r["bytes_up"][i] for r in rounds) for i in range(n)]
assert all(b > 0 for b in sent), f"bytes sent per worker: {sent}"
print(f"    metrics: {len(rounds)} rounds, end ok=true, loss {end.get('loss')}, bytes up per worker {sent}, "
      f"down {end.get('cum_bytes_down')} in all, {end.get('time_s')} s")
EOF

# -- 4b. CurveZMQ ------------------------------------------------------------------------------------
if [[ "${SMOKE_CURVE:-1}" != 0 ]]; then
  p="${PROJECT}cz"
  log "compose with CurveZMQ: keys from psc keygen, WORKERS=2, -f deploy/docker-compose.curve.yml"
  mkdir -p "$WORK/keys"
  for side in server worker; do
    docker run --rm --network none --user "$(id -u):$(id -g)" -v "$WORK/keys:/keys" "$TAG" keygen "/keys/$side" --name "$side" > /dev/null \
      || fail "psc keygen in the image failed"
  done
  cp "$WORK/keys/server/server.key" "$WORK/keys/worker/"
  t=$(date +%s)
  FILES=(-f "$ROOT/deploy/docker-compose.yml" -f "$ROOT/deploy/docker-compose.curve.yml")
  EXTRA_ENV=(CURVE_KEYS="$WORK/keys")
  cluster "$p" 2 2
  FILES=(-f "$ROOT/deploy/docker-compose.yml")
  EXTRA_ENV=()
  exit_codes "$p" | sed 's/^/    /'
  bad=$(exit_codes "$p" | awk '$2 != 0')
  [[ -z "$bad" ]] || { tail -n 30 "$WORK/$p.log"; fail "CURVE cluster: containers that did not exit 0: $bad"; }
  python3 -c "import json, sys; end = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][-1]; sys.exit(0 if end.get('ok') is True else 1)" \
    "$WORK/runs-$p/$p.jsonl" || fail "CURVE cluster: the metrics file's end line is not ok"
  for f in "$WORK/keys/server/server.key_secret" "$WORK/keys/worker/worker.key_secret"; do
    secret=$(sed -n 's/^ *secret-key = "\(.*\)"/\1/p' "$f")
    [[ -n "$secret" ]] || fail "no secret key in $f"
    if grep -qF -- "$secret" "$WORK/$p.log"; then fail "a secret key appears in the CURVE cluster's logs"; fi
  done
  log "CURVE cluster ok in $(( $(date +%s) - t )) s: encrypted run ended ok, no secret key in the logs"
fi

# -- 5. the scale check -------------------------------------------------------------------------------
if [[ "${SMOKE_MISMATCH:-1}" != 0 ]]; then
  log "compose: WORKERS=2 up --scale worker=3 must fail and name both numbers"
  t=$(date +%s)
  cluster "${PROJECT}mm" 2 3
  exit_codes "${PROJECT}mm" | sed 's/^/    /'
  grep -m1 'psc entrypoint: error' "$WORK/${PROJECT}mm.log" | sed 's/^/    /' || true
  grep -q "compose runs 3 containers of service 'worker' .* waits for 2 workers" "$WORK/${PROJECT}mm.log" \
    || { tail -n 30 "$WORK/${PROJECT}mm.log"; fail "the mismatch was not reported"; }
  server_code=$(exit_codes "${PROJECT}mm" | awk '/server/ {print $2}')
  [[ "$server_code" != 0 ]] || fail "the mismatched server exited 0"
  log "mismatch reported, server exit $server_code, in $(( $(date +%s) - t )) s"
fi

# -- 6. docker stop -----------------------------------------------------------------------------------
if [[ "${SMOKE_STOP:-1}" != 0 ]]; then
  p="${PROJECT}st"
  COMPOSE_PROJECTS+=("$p")
  mkdir -p "$WORK/runs-$p"
  log "docker stop: a 100000-round run, stopped after its first progress line"
  EXTRA_ENV=(PSC_SERVER_ROUNDS=100000)
  compose_env "$p" 2 "${COMPOSE_CMD[@]}" -p "$p" -f "$ROOT/deploy/docker-compose.yml" up -d --no-build > "$WORK/$p.up.log" 2>&1 \
    || { cat "$WORK/$p.up.log"; fail "compose up failed"; }
  EXTRA_ENV=()
  server=$(docker ps -q --filter "label=com.docker.compose.project=$p" --filter "label=com.docker.compose.service=server")
  for _ in $(seq 120); do docker logs "$server" 2>&1 | grep -Eq 'round [0-9]+/' && break; sleep 1; done
  docker logs "$server" 2>&1 | grep -Eq 'round [0-9]+/' || fail "the long run never made progress"
  t=$(date +%s.%N)
  docker stop -t 30 "$server" > /dev/null
  stop_s=$(python3 -c "print(f'{$(date +%s.%N) - $t:.1f}')")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$server")
  docker logs --tail 3 "$server" 2>&1 | sed 's/^/    /'
  log "docker stop: the server exited $code after $stop_s s"
  [[ "$code" == 143 || "$code" == 130 || "$code" == 0 ]] || fail "the server exited $code after SIGTERM (137: it ignored it and was killed)"
fi

log "PASSED: image $(awk -v s="$SIZE" 'BEGIN {printf "%.2f GB", s/1e9}') built in ${BUILD_S} s ($TORCH_VERSION), $WORKERS-worker cluster in ${RUN_S} s"
