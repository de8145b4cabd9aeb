#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run every test tier. Extra arguments go to pytest.
#   unit/       the SDK, transport, engines, HTTP layer (no servers)
#   system/     `servegrid serve` of real graphs on this host
#   integration/ real etcd and nats-server on loopback
#   cluster/    test nodes (systemd-nspawn); needs root
#   stacks/     the Pulumi programs under Pulumi's mocks (no cloud, no Pulumi CLI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "test: ruff"
.venv/bin/ruff check runtime tests bench examples stacks
echo "test: yamllint, ansible-lint (production profile)"
.venv/bin/yamllint roles playbooks inventories molecule
.venv/bin/ansible-lint -q --profile production roles/ playbooks/
# In CI a missing testbed or server binary is a failure, never a silent skip.
if [ "${CI:-}" = "true" ]; then
  export SERVEGRID_REQUIRE_TESTBED=1
fi
echo "test: pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
