#!/usr/bin/env bash
# Build the wheelhouse the servegrid_install role copies to nodes that have no internet:
# servegrid and every dependency as wheels, in DIR (default .wheelhouse). Needs this machine's
# package index (or pip cache) once; the nodes never do.
#   scripts/build-wheelhouse.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.wheelhouse}"
mkdir -p "$dir"
python="${PYTHON:-.venv/bin/python}"
"$python" -m pip wheel -q --disable-pip-version-check -w "$dir" . 2>&1 | grep -v "^WARNING: Location" || true
ls "$dir"/servegrid-*.whl >/dev/null
echo "wheelhouse: $(cd "$dir" && pwd) ($(ls "$dir" | wc -l) wheels)"
