#!/usr/bin/env bash
# Spark GPU discovery script (spark.worker.resource.gpu.discoveryScript / spark.driver.resource.gpu.discoveryScript).
# Prints the resource in Spark's format, one address per GPU index reported by nvidia-smi:
#   {"name":"gpu","addresses":["0","1"]}
# Exits non-zero (with a message on stderr) when nvidia-smi is missing or fails, so Spark reports it.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-discovery.sh: nvidia-smi not found on PATH (no NVIDIA driver/runtime in this container?)" >&2
  exit 1
fi
if ! out=$(nvidia-smi --query-gpu=index --format=csv,noheader); then
  echo "gpu-discovery.sh: nvidia-smi --query-gpu=index failed" >&2
  exit 1
fi

addresses=""
while IFS= read -r line; do
  idx=$(printf '%s' "$line" | tr -d '[:space:]')
  [ -z "$idx" ] && continue
  case "$idx" in
    *[!0-9]*) echo "gpu-discovery.sh: unexpected GPU index from nvidia-smi: '$idx'" >&2; exit 1 ;;
  esac
  addresses="${addresses:+$addresses,}\"$idx\""
done <<< "$out"
printf '{"name":"gpu","addresses":[%s]}\n' "$addresses"
