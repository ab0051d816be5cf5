#!/usr/bin/env bash
# psc on a multi-GPU host (docs/deploy.md).
#
# One host, server and workers together (K workers per GPU, worker i on cuda:(i mod G)):
#   deploy/launch_multi_gpu.sh [--per-gpu K] [--workers N] -- [RUN OPTIONS of psc launch]
#   e.g. deploy/launch_multi_gpu.sh --per-gpu 2 -- --algorithm marina-p --rounds 500 --metrics runs/mp.jsonl
#   (this is `psc launch --workers G*K --device auto`; the server binds 127.0.0.1 only)
#
# A GPU host that joins a server elsewhere (several hosts): start only workers here.
#   deploy/launch_multi_gpu.sh --connect tcp://SERVER:5555 [--per-gpu K] [--workers N] [--rank-offset R]
#   Worker j of this host runs on cuda:(j mod G) with LOCAL_RANK=j. Ranks: assigned by the server in
#   join order, or, with --rank-offset R, R + j (give each host its own block of ranks).
#   Extra `psc worker` options go after `--` (e.g. -- --timeout 120).
#   CurveZMQ: --key-dir DIR gives worker j of this host the j-th DIR/*.key_secret (in name order) and
#   DIR/server.key, the server's public key: one identity per worker, as an --allow list needs.
#   (-- --key FILE --server-public FILE, or PSC_WORKER_KEY/PSC_WORKER_SERVER_PUBLIC, give all the
#   workers one key: enough for a server without --allow.) On one host: -- --server-key FILE.
#
# N defaults to G*K (G: GPUs torch sees; 1 worker on the CPU where there is none). PYTHON selects the
# interpreter with psc installed (default: python3). Exit status: 0 when every process exits 0.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

PYTHON="${PYTHON:-python3}"
connect="" per_gpu=1 workers="" rank_offset="" key_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connect) connect="${2:?--connect needs an endpoint}"; shift 2 ;;
    --per-gpu) per_gpu="${2:?--per-gpu needs a number}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
    --rank-offset) rank_offset="${2:?--rank-offset needs a number}"; shift 2 ;;
    --key-dir) key_dir="${2:?--key-dir needs a folder}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_multi_gpu.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
for v in "$per_gpu" "${workers:-1}" "${rank_offset:-0}"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "launch_multi_gpu.sh: not a number: $v" >&2; exit 2; }
done

gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ -z "$workers" ]]; then
  workers=$(( gpus > 0 ? gpus * per_gpu : 1 ))
fi
[[ "$workers" -ge 1 ]] || { echo "launch_multi_gpu.sh: --workers must be at least 1" >&2; exit 2; }

if [[ -z "$connect" ]]; then
  [[ -z "$key_dir" ]] || { echo "launch_multi_gpu.sh: --key-dir is for --connect (on one host: -- --server-key FILE)" >&2; exit 2; }
  echo "launch_multi_gpu.sh: $workers workers on $gpus GPU(s), server on this host" >&2
  exec "$PYTHON" -m psc launch --workers "$workers" --device auto "$@"
fi

keys=()
if [[ -n "$key_dir" ]]; then
  [[ -f "$key_dir/server.key" ]] || { echo "launch_multi_gpu.sh: --key-dir $key_dir: no server.key (the server's public key) in it" >&2; exit 2; }
  shopt -s nullglob
  keys=("$key_dir"/*.key_secret)
  shopt -u nullglob
  [[ ${#keys[@]} -ge "$workers" ]] || { echo "launch_multi_gpu.sh: --key-dir $key_dir: ${#keys[@]} secret key file(s) (*.key_secret) for $workers workers; one each (psc keygen $key_dir --name NAME)" >&2; exit 2; }
fi

echo "launch_multi_gpu.sh: $workers workers on $gpus GPU(s), server at $connect${key_dir:+ (CURVE keys from $key_dir)}" >&2
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'cleanup; exit 130' INT TERM
for (( j = 0; j < workers; j++ )); do
  device=cpu
  (( gpus > 0 )) && device="cuda:$(( j % gpus ))"
  rank_args=()
  [[ -n "$rank_offset" ]] && rank_args=(--rank "$(( rank_offset + j ))")
  [[ -n "$key_dir" ]] && rank_args+=(--key "${keys[$j]}" --server-public "$key_dir/server.key")
  LOCAL_RANK=$j "$PYTHON" -m psc worker --connect "$connect" --device "$device" "${rank_args[@]}" "$@" &
  pids+=("$!")
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=1
done
exit "$status"
