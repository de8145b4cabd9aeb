"""Find the Debian mirror and proxy that apt on this host is configured with.

debootstrap must fetch from the same place apt does (a host may only reach Debian through a
particular mirror or proxy), so nothing here names a host: it is all read from apt's config.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .system import TestbedError, run

SOURCES_LIST = Path("/etc/apt/sources.list")
SOURCES_DIR = Path("/etc/apt/sources.list.d")


@dataclass(frozen=True)
class Mirror:
    url: str
    keyring: str | None
    proxy_env: dict[str, str]


def _deb822_entries(text: str) -> list[dict[str, str]]:
    entries, current = [], {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                entries.append(current)
            current = {}
            continue
        if line.lstrip().startswith("#") or line[0].isspace():
            continue
        key, _, value = line.partition(":")
        current[key.strip().lower()] = value.strip()
    return entries


def _candidates() -> list[tuple[str, list[str], str | None]]:
    """(uri, suites, keyring) for every enabled deb source apt knows."""
    out: list[tuple[str, list[str], str | None]] = []
    files = [SOURCES_LIST] if SOURCES_LIST.exists() else []
    if SOURCES_DIR.is_dir():
        files += sorted(SOURCES_DIR.glob("*.list")) + sorted(SOURCES_DIR.glob("*.sources"))
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for e in _deb822_entries(text):
                if "deb" not in e.get("types", "").split():
                    continue
                if e.get("enabled", "yes").lower() == "no":
                    continue
                for uri in e.get("uris", "").split():
                    out.append((uri, e.get("suites", "").split(), e.get("signed-by")))
            continue
        for line in text.splitlines():
            words = shlex.split(line.split("#", 1)[0]) if line.strip() else []
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            keyring = None
            if words and words[0].startswith("["):
                opts = []
                while words:
                    w = words.pop(0)
                    opts.append(w.strip("[]"))
                    if w.endswith("]"):
                        break
                for o in opts:
                    if o.startswith("signed-by="):
                        keyring = o.split("=", 1)[1]
            if len(words) >= 2:
                out.append((words[0], [words[1]], keyring))
    return out


def _proxy_env() -> dict[str, str]:
    proc = run(
        ["apt-config", "shell", "HP", "Acquire::http::Proxy", "SP", "Acquire::https::Proxy"],
        check=False,
    )
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        value = shlex.split(value)[0] if value else ""
        if value and value.upper() != "DIRECT":
            env["http_proxy" if name == "HP" else "https_proxy"] = value
    return env


def find_mirror(release: str) -> Mirror:
    """The URI apt uses for `release` itself (not -security or -updates)."""
    for uri, suites, keyring in _candidates():
        if release in suites and uri.startswith(("http://", "https://", "file:/")):
            if keyring and not keyring.startswith("/"):
                keyring = None  # an inline key block, not a file debootstrap can use
            return Mirror(url=uri, keyring=keyring, proxy_env=_proxy_env())
    raise TestbedError(
        f"no apt source for Debian {release!r} in {SOURCES_LIST} or {SOURCES_DIR}/: the "
        f"testbed builds its base image from the mirror apt uses; add a `deb` source for "
        f"{release} or set SERVEGRID_TESTBED_RELEASE to a release apt is configured for"
    )
