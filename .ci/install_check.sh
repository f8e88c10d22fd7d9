#!/usr/bin/env bash
# Install check: the README's install command works in a fresh virtual environment, on a re-install, and
# from another directory, and it builds the native extension (the "cpu" backend is available after it).
# A fresh venv sees the machine's torch (--system-site-packages); torch==2.13.0 is installed into it
# only when none is importable. Takes about two native builds (a few minutes on two cores).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m venv --system-site-packages --without-pip "$WORK/venv"  # pip and setuptools: the machine's
PY="$WORK/venv/bin/python"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
cd "$WORK"  # another directory than the checkout
touch "$WORK/started"  # the extension must be (re)built by these installs, not left over in the checkout
for attempt in 1 2; do  # the second run is a re-install over the first
  echo "install_check: install $attempt: pip install --no-build-isolation -e \"$REPO[test]\""
  "$PY" -m pip install -q --no-build-isolation -e "$REPO[test]"
  "$PY" - "$REPO" "$WORK/started" <<'PY'
import importlib, os, sys
import vera_kernels as vk
repo = os.path.realpath(sys.argv[1])
where = os.path.realpath(vk.__file__)
assert where.startswith(repo + os.sep), f"imported {where}, not the checkout {repo}"
ext = importlib.import_module("vera_kernels._C").__file__
assert os.path.getmtime(ext) >= os.path.getmtime(sys.argv[2]), f"{ext} was not built by this install"
report = vk.backends()
assert report["cpu"] is None, f"the native 'cpu' backend is unavailable after install: {report['cpu']}"
assert report["torch"] is None, report
print(f"install_check: ok, vera_kernels from {os.path.dirname(where)}, backends {report}")
PY
done
