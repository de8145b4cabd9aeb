#!/bin/sh
# Debian packages the test-node harness (tests/testbed) needs on the host that runs it.
# Run as root; the project's setup calls it.
set -eu
apt-get install -y --no-install-recommends \
    systemd-container debootstrap iproute2 openssh-client debian-archive-keyring
