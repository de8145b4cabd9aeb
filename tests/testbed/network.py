"""The testbed's private L2 network: one host bridge, a netns and veth pair per node.

No NAT, no forwarding, no default route in the nodes: they reach the bridge subnet and nothing
else. The host keeps the bridge address so Ansible on the host reaches every node.
"""

from __future__ import annotations

import json

from .config import TestbedConfig
from .system import run


def _links() -> list[dict]:
    return json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")


def link_names() -> list[str]:
    return [link["ifname"] for link in _links()]


def link_is_up(name: str) -> bool:
    for link in _links():
        if link["ifname"] == name:
            return "UP" in link.get("flags", [])
    return False


def netns_names() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [n["name"] for n in json.loads(out)] if out else []


def ensure_bridge(cfg: TestbedConfig) -> None:
    if cfg.bridge not in link_names():
        run(["ip", "link", "add", cfg.bridge, "type", "bridge"])
    run(["ip", "addr", "replace", f"{cfg.bridge_ip}/{cfg.subnet.prefixlen}", "dev", cfg.bridge])
    run(["ip", "link", "set", cfg.bridge, "up"])


def ensure_node_link(cfg: TestbedConfig, name: str, ip: str) -> str:
    """Create the node's netns and veth (idempotent); return the netns name."""
    ns = cfg.netns(name)
    if ns not in netns_names():
        run(["ip", "netns", "add", ns])
    veth = ns  # host side of the pair carries the same name as the netns
    if veth not in link_names():
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", veth, "master", cfg.bridge])
    run(["ip", "link", "set", veth, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "addr", "replace", f"{ip}/{cfg.subnet.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    return ns


def set_link(cfg: TestbedConfig, name: str, up: bool) -> None:
    """Cut or restore a node's link: the host side of its veth goes down or up."""
    run(["ip", "link", "set", cfg.netns(name), "up" if up else "down"])


def ours(cfg: TestbedConfig) -> tuple[list[str], list[str]]:
    """(netns names, link names) that belong to this testbed."""
    mine = f"{cfg.prefix}-"
    namespaces = [n for n in netns_names() if n.startswith(mine)]
    links = [n for n in link_names() if n.startswith(mine) or n == cfg.bridge]
    return namespaces, links


def remove_all(cfg: TestbedConfig) -> None:
    namespaces, links = ours(cfg)
    for ns in namespaces:
        run(["ip", "netns", "delete", ns], check=False)
    # Deleting a netns deletes the veth end inside it and with it the host end; delete any
    # host end left over from a half-made node, then the bridge.
    for link in [lk for lk in link_names() if lk in links and lk != cfg.bridge]:
        run(["ip", "link", "delete", link], check=False)
    if cfg.bridge in link_names():
        run(["ip", "link", "delete", cfg.bridge], check=False)
