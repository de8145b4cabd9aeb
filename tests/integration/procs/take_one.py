"""Take one item from a work queue, print it, and never ack it (the test kills us).

Usage: take_one.py NATS_URL QUEUE ACK_WAIT
"""

import asyncio
import sys

from servegrid.distributed.nats_plane import NatsWorkQueue, connect_nats


async def main() -> None:
    url, name, ack_wait = sys.argv[1:4]
    connection = await connect_nats(url)
    queue = NatsWorkQueue(connection, name, ack_wait=float(ack_wait))
    item = await queue.dequeue(timeout=10.0)
    print("TOOK", item.data.decode() if item else "", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
