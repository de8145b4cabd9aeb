"""Moving KV caches from prefill workers to decode workers over the bulk path.

The request plane carries small frames (requests, tokens); KV caches are megabytes, so they
go over a separate TCP path: each decode worker that prefills remotely runs a ``KvReceiver``
listener, and a prefill worker connects to it with ``send_kv``. What moves, and into which
blocks, is the engine's business (``servegrid.engines.disagg``); this package only frames it:
one header (which transfer, which tokens, how many bytes in which segments), the segments'
raw bytes read straight into the engine's buffers, and one reply.
"""

from servegrid.kv_transfer.receiver import KvReceiver, RemotePrefillFailedError
from servegrid.kv_transfer.sender import KvTransferRefusedError, send_kv
from servegrid.kv_transfer.wire import KvTarget, KvTransferHeader, KvTransferReply

__all__ = [
    "KvReceiver",
    "KvTarget",
    "KvTransferHeader",
    "KvTransferRefusedError",
    "KvTransferReply",
    "RemotePrefillFailedError",
    "send_kv",
]
