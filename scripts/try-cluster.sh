#!/usr/bin/env bash
# Try a four-node deployment on this machine: four test nodes (tests/testbed), the disaggregated
# graph deployed to them with Ansible, one answer from the frontend. Prints each step's time as
# it ends and all of them again at the end.
#   scripts/try-cluster.sh          # bring up and deploy (again: only what changed)
#   scripts/try-cluster.sh down     # tear the deployment and the nodes down
# Needs root and scripts/setup.sh's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
inventory=inventories/testbed
step_times=()

step() {  # step "what" command...: run it, print how long it took (and stop if it failed)
  local what=$1 start=$SECONDS rc=0
  shift
  "$@" || rc=$?
  local line
  line=$(printf '== %-44s %4ds' "$what" $((SECONDS - start)))
  if [ "$rc" -ne 0 ]; then
    line="$line  FAILED (exit $rc)"
  fi
  step_times+=("$line")
  echo "$line"
  return "$rc"
}

summary() {  # all step times again, after the playbooks' long output
  [ "${#step_times[@]}" -gt 0 ] || return 0
  echo
  echo "Step times:"
  printf '%s\n' "${step_times[@]}"
}
trap summary EXIT

nodes_running() {
  python -m tests.testbed status --json | python -c \
    'import json, sys; sys.exit(0 if any(n["state"] == "running" for n in json.load(sys.stdin)["nodes"]) else 1)'
}

if [ "${1:-}" = "down" ]; then
  # The nodes are thrown away next, so a teardown that fails (a node already stopped) must not
  # keep them from being removed; with no node running there is nothing to tear down.
  if [ -f "$inventory/hosts.ini" ] && nodes_running; then
    step "teardown.yml" ansible-playbook -i "$inventory" playbooks/teardown.yml ||
      echo "teardown.yml failed (see above); removing the test nodes anyway"
  fi
  step "test nodes down" python -m tests.testbed down
  rm -f "$inventory/hosts.ini"  # names nodes that no longer exist
  exit 0
fi

step "4 test nodes up" python -m tests.testbed up 4 --inventory "$inventory/hosts.ini"
step "wheelhouse built" scripts/build-wheelhouse.sh .wheelhouse
step "deploy-disagg.yml" ansible-playbook -i "$inventory" playbooks/deploy-disagg.yml
frontend=$(awk '/^node1 /{sub("ansible_host=", "", $2); print $2}' "$inventory/hosts.ini")
step "chat completion from $frontend:8000" curl -sS --fail-with-body --max-time 60 -w '\n' \
  "$frontend:8000/v1/chat/completions" -H "Content-Type: application/json" -d '{
    "model": "servegrid/tiny-chat",
    "messages": [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless magic, lies a forgotten city."}],
    "stream": false, "max_tokens": 30}'
step "validate.yml" ansible-playbook -i "$inventory" playbooks/validate.yml
