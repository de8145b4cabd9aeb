"""Register instances in etcd, print READY, then keep the lease alive until killed.

Usage: register.py ENDPOINTS TTL NAMESPACE HEX_ID[,HEX_ID...]
"""

import asyncio
import logging
import sys

from servegrid.distributed.discovery.base import InstanceInfo
from servegrid.distributed.discovery.etcd import EtcdDiscovery


async def main() -> None:
    endpoints, ttl, namespace, ids = sys.argv[1:5]
    discovery = EtcdDiscovery(endpoints, ttl=float(ttl))
    for index, hex_id in enumerate(ids.split(",")):
        info = InstanceInfo(
            namespace, "Worker", "generate", int(hex_id, 16), "127.0.0.1", 20000 + index
        )
        await discovery.register(info)
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main())
