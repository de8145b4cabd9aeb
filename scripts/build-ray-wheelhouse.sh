#!/usr/bin/env bash
# Download Ray and every dependency as wheels for the nodes' Python into DIR, so the ray_cluster
# role installs it on nodes without internet (ray_cluster_wheelhouse_src or _pip_find_links).
# The version is the role's default (roles/ray_cluster/defaults/main.yml) unless RAY_VERSION
# is set; the nodes' Python and CPU are arguments because they need not match this machine's.
#   scripts/build-ray-wheelhouse.sh DIR [PYTHON_VERSION (3.11)] [ARCH (x86_64|aarch64)]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: scripts/build-ray-wheelhouse.sh DIR [PYTHON_VERSION] [ARCH]}"
pyver="${2:-3.11}"
arch="${3:-x86_64}"
python="${PYTHON:-.venv/bin/python}"
version="${RAY_VERSION:-$(sed -n 's/^ray_cluster_version: "\(.*\)"$/\1/p' roles/ray_cluster/defaults/main.yml)}"
[ -n "$version" ] || { echo "build-ray-wheelhouse: no ray_cluster_version in roles/ray_cluster/defaults/main.yml" >&2; exit 2; }
mkdir -p "$dir"
"$python" -m pip download -q --disable-pip-version-check --only-binary=:all: \
  --implementation cp --python-version "$pyver" \
  --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
  -d "$dir" "ray==$version" 2>&1 | grep -v "^WARNING: Location" || true
ls "$dir"/ray-"$version"-*.whl >/dev/null
echo "ray wheelhouse: $(cd "$dir" && pwd) (ray $version for CPython $pyver on $arch, $(ls "$dir" | wc -l) wheels)"
