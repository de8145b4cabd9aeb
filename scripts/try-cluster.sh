#!/usr/bin/env bash
# Try a four-node deployment on this machine: four test nodes (tests/testbed), the disaggregated
# graph deployed to them with Ansible, one answer from the frontend. Prints each step's time.
#   scripts/try-cluster.sh          # bring up and deploy (again: only what changed)
#   scripts/try-cluster.sh down     # tear the deployment and the nodes down
# Needs root and scripts/setup.sh's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
inventory=inventories/testbed

step() {  # step "what" command...: run it, print how long it took
  local what=$1 start=$SECONDS
  shift
  "$@"
  printf '== %-44s %4ds\n' "$what" $((SECONDS - start))
}

if [ "${1:-}" = "down" ]; then
  step "teardown.yml" ansible-playbook -i "$inventory" playbooks/teardown.yml
  step "test nodes down" python -m tests.testbed down
  exit 0
fi

step "4 test nodes up" python -m tests.testbed up 4 --inventory "$inventory/hosts.ini"
step "wheelhouse built" scripts/build-wheelhouse.sh .wheelhouse
step "deploy-disagg.yml" ansible-playbook -i "$inventory" playbooks/deploy-disagg.yml
frontend=$(awk '/^node1 /{sub("ansible_host=", "", $2); print $2}' "$inventory/hosts.ini")
step "chat completion from $frontend:8000" curl -sS --max-time 60 \
  "$frontend:8000/v1/chat/completions" -H "Content-Type: application/json" -d '{
    "model": "servegrid/tiny-chat",
    "messages": [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless magic, lies a forgotten city."}],
    "stream": false, "max_tokens": 30}'
echo
step "validate.yml" ansible-playbook -i "$inventory" playbooks/validate.yml
