"""The cluster secret: where it is read from, what is refused, and the commands that use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servegrid.distributed import env
from servegrid.distributed.errors import ClusterSecretError
from servegrid.distributed.secret import is_loopback_host, load_cluster_secret

REPO = Path(__file__).resolve().parents[2]
GOOD = "a-good-cluster-secret-0123456789"
NOBODY = 65534


def _file(tmp_path: Path, content: str, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_no_variable_means_no_secret():
    assert load_cluster_secret({}) is None


def test_the_secret_is_read_from_the_file_without_surrounding_whitespace(tmp_path):
    path = _file(tmp_path, f"{GOOD}\n")
    assert load_cluster_secret({env.SERVEGRID_CLUSTER_SECRET_FILE: str(path)}) == GOOD
    assert load_cluster_secret({env.SERVEGRID_CLUSTER_SECRET: GOOD}) == GOOD


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_file_others_may_read_is_refused(tmp_path, mode):
    path = _file(tmp_path, GOOD, mode)
    with pytest.raises(ClusterSecretError, match=f"chmod 600 {path}"):
        load_cluster_secret({env.SERVEGRID_CLUSTER_SECRET_FILE: str(path)})


def test_a_file_of_another_user_is_refused(tmp_path):
    if os.getuid() == 0:
        path = _file(tmp_path, GOOD)
        os.chown(path, NOBODY, NOBODY)
    else:
        path = Path("/etc/passwd")  # root's: another user's for us
    with pytest.raises(ClusterSecretError, match="belongs to another user"):
        load_cluster_secret({env.SERVEGRID_CLUSTER_SECRET_FILE: str(path)})


@pytest.mark.parametrize(
    ("variables", "complaint"),
    [
        ({env.SERVEGRID_CLUSTER_SECRET: "short"}, "at least 16"),
        ({env.SERVEGRID_CLUSTER_SECRET: 'has"a-quote-0123456789'}, "quotes"),
        ({env.SERVEGRID_CLUSTER_SECRET_FILE: "/nonexistent/secret"}, "does not exist"),
        (
            {env.SERVEGRID_CLUSTER_SECRET: GOOD, env.SERVEGRID_CLUSTER_SECRET_FILE: "/x"},
            "set only one",
        ),
    ],
)
def test_bad_secrets_are_refused_with_what_to_do(variables, complaint):
    with pytest.raises(ClusterSecretError, match=complaint):
        load_cluster_secret(variables)


def test_loopback_is_127_slash_8_and_ipv6_one_not_the_wildcard():
    assert all(map(is_loopback_host, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "::", "", "192.0.2.1"]))


def _servegrid(*args: str, **variables: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SERVEGRID_CLUSTER_SECRET")}
    clean.pop(env.ETCD_ENDPOINTS, None)
    return subprocess.run(
        [sys.executable, "-m", "servegrid.cli", *args],
        env={**clean, **variables},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_secret_init_writes_a_0600_file_that_loads_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "cluster.secret"
    made = _servegrid("secret", "init", str(path))
    assert made.returncode == 0, made.stderr
    assert env.SERVEGRID_CLUSTER_SECRET_FILE in made.stdout
    assert path.stat().st_mode & 0o777 == 0o600
    secret = load_cluster_secret({env.SERVEGRID_CLUSTER_SECRET_FILE: str(path)})
    assert secret is not None and len(secret) >= 40

    again = _servegrid("secret", "init", str(path))
    assert again.returncode == 2 and "--force" in again.stderr
    assert load_cluster_secret({env.SERVEGRID_CLUSTER_SECRET_FILE: str(path)}) == secret


def test_serve_beyond_loopback_without_a_secret_refuses_to_start_and_says_what_to_set():
    refused = _servegrid("serve", "-f", "configs/agg.yaml", SERVEGRID_BIND_HOST="0.0.0.0")
    assert refused.returncode == 2
    assert env.SERVEGRID_CLUSTER_SECRET_FILE in refused.stderr
    assert "servegrid secret init" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "starting" not in refused.stdout + refused.stderr  # nothing was started
