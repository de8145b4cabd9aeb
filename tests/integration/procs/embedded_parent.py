"""Start an EmbeddedNats, print its PID and URL, and wait to be killed."""

import asyncio

from servegrid.distributed.embedded_nats import EmbeddedNats


async def main() -> None:
    server = EmbeddedNats()
    await server.start()
    print("NATS", server.pid, server.url, server._own_dir, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
