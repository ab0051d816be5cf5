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
#
# N defaults to G*K (G: GPUs torch sees; 1 worker on the CPU where there is none). PYTHON selects the
# interpreter with psc installed (default: python3). Exit status: 0 when every process exits 0.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

PYTHON="${PYTHON:-python3}"
connect="" per_gpu=1 workers="" rank_offset=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connect) connect="${2:?--connect needs an endpoint}"; shift 2 ;;
    --per-gpu) per_gpu="${2:?--per-gpu needs a number}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
    --rank-offset) rank_offset="${2:?--rank-offset needs a number}"; shift 2 ;;
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
  echo "launch_multi_gpu.sh: $workers workers on $gpus GPU(s), server on this host" >&2
  exec "$PYTHON" -m psc launch --workers "$workers" --device auto "$@"
fi

echo "launch_multi_gpu.sh: $workers workers on $gpus GPU(s), server at $connect" >&2
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'cleanup; exit 130' INT TERM
for (( j = 0; j < workers; j++ )); do
  device=cpu
  (( gpus > 0 )) && device="cuda:$(( j % gpus ))"
  rank_args=()
  [[ -n "$rank_offset" ]] && rank_args=(--rank "$(( rank_offset + j ))")
  LOCAL_RANK=$j "$PYTHON" -m psc worker --connect "$connect" --device "$device" "${rank_args[@]}" "$@" &
  pids+=("$!")
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=1
done
exit "$status"
