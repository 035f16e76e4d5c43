#!/usr/bin/env bash
# One entry point that sets itself up (idempotently) and then runs a task.
#   ./dev.sh train [jobs/train.py flags]   train on Fashion-MNIST through local Spark, print test accuracy
#   ./dev.sh test  [pytest args]           run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SPARKDL_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

apt_deps() {
  # Debian packages: OpenCL runtime (PoCL), CLBlast, the Fashion-MNIST dataset. Only as root, only if missing.
  local want=(pocl-opencl-icd libclblast-dev ocl-icd-opencl-dev dataset-fashion-mnist)
  local missing=()
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "dev.sh: not root; please install: ${missing[*]}" >&2
  fi
}

py_deps() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat setup.py | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[opencl,test,plot,onnx]"
    touch "$stamp"
  fi
}

apt_deps
py_deps
export PATH="$PWD/$VENV/bin:$PATH"
export PYSPARK_PYTHON="$PWD/$VENV/bin/python"
export PYSPARK_DRIVER_PYTHON="$PWD/$VENV/bin/python"

task=${1:-}
shift || true
case "$task" in
  train) exec "$VENV/bin/spark-submit" --master "${MASTER:-local[2]}" --driver-memory 4g --conf spark.log.level=WARN \
    jobs/train.py "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh train|test [args]" >&2; exit 2 ;;
esac
