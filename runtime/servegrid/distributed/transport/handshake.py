"""The request-plane handshake, defined once: before any frame, both ends prove they hold the
cluster secret (``distributed/secret.py``) without sending it. Every other listener between
servegrid processes (the KV transfer path) opens with the same handshake
(``accept_stream``/``connect_stream``).

Three fixed-size messages, then frames (``frames.py``) in both directions:

    server → client  HELLO    38 bytes: b"SGRP" | u8 version (1) | u8 auth | 32-byte server nonce
    client → server  PROOF    70 bytes: b"SGRP" | u8 version (1) | u8 auth | 32-byte client nonce
                                        | 32-byte client proof
    server → client  VERDICT  33 bytes: u8 status | 32-byte server proof

``auth`` is 1 when the sender holds a secret (HMAC-SHA256), 0 when it has none. The proofs
(``+`` is concatenation, the secret is its ASCII bytes) are

    client proof = HMAC-SHA256(secret, b"servegrid-request-plane-v1 client" + Ns + Nc)
    server proof = HMAC-SHA256(secret, b"servegrid-request-plane-v1 server" + Ns + Nc)

with Ns the server nonce and Nc the client nonce; a proof is all zeros when its sender has
no secret. Different labels keep one side's proof from being replayed as the other's; fresh
nonces on both sides keep a recorded handshake from being replayed at all.

Status 0 accepts the connection (the client then checks the server proof: a process that does
not hold the secret cannot pass as a worker); any other status is followed by the server
closing the connection:

    1  the client's proof is wrong (a different secret)
    2  the client has no secret and this server requires one
    3  the client speaks a protocol version this server does not

A server with a secret requires it from every client. A server without one (allowed only on
loopback) accepts clients without one; a client that holds a secret refuses such a server,
since a process that cannot prove the secret must not receive its requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct

from servegrid.distributed import env
from servegrid.distributed.secret import HOW_TO_SET

MAGIC = b"SGRP"
VERSION = 1
NONCE_SIZE = 32
PROOF_SIZE = 32
AUTH_NONE = 0
AUTH_HMAC_SHA256 = 1

HELLO = struct.Struct(f"!4sBB{NONCE_SIZE}s")
PROOF = struct.Struct(f"!4sBB{NONCE_SIZE}s{PROOF_SIZE}s")
VERDICT = struct.Struct(f"!B{PROOF_SIZE}s")

ACCEPTED = 0
REJECTED_WRONG_SECRET = 1
REJECTED_NO_SECRET = 2
REJECTED_VERSION = 3

_CLIENT_LABEL = b"servegrid-request-plane-v1 client"
_SERVER_LABEL = b"servegrid-request-plane-v1 server"
NO_PROOF = bytes(PROOF_SIZE)


class HandshakeError(Exception):
    """The peer's handshake bytes are not this protocol."""


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _proof(label: bytes, secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, label + server_nonce + client_nonce, hashlib.sha256).digest()


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _proof(_CLIENT_LABEL, secret, server_nonce, client_nonce)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _proof(_SERVER_LABEL, secret, server_nonce, client_nonce)


def proofs_equal(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


def pack_hello(has_secret: bool, server_nonce: bytes) -> bytes:
    return HELLO.pack(MAGIC, VERSION, AUTH_HMAC_SHA256 if has_secret else AUTH_NONE, server_nonce)


def unpack_hello(data: bytes) -> tuple[int, int, bytes]:
    """(version, auth, server nonce) of a server HELLO."""
    magic, version, auth, nonce = HELLO.unpack(data)
    if magic != MAGIC:
        raise HandshakeError("the peer is not a servegrid request-plane server")
    return version, auth, nonce


def pack_proof(secret: bytes | None, server_nonce: bytes, client_nonce: bytes) -> bytes:
    if secret is None:
        return PROOF.pack(MAGIC, VERSION, AUTH_NONE, client_nonce, NO_PROOF)
    proof = client_proof(secret, server_nonce, client_nonce)
    return PROOF.pack(MAGIC, VERSION, AUTH_HMAC_SHA256, client_nonce, proof)


def unpack_proof(data: bytes) -> tuple[int, int, bytes, bytes]:
    """(version, auth, client nonce, client proof) of a client PROOF."""
    magic, version, auth, nonce, proof = PROOF.unpack(data)
    if magic != MAGIC:
        raise HandshakeError("the peer did not open with a servegrid handshake")
    return version, auth, nonce, proof


def pack_verdict(status: int, proof: bytes = NO_PROOF) -> bytes:
    return VERDICT.pack(status, proof)


def unpack_verdict(data: bytes) -> tuple[int, bytes]:
    status, proof = VERDICT.unpack(data)
    return status, proof


# -- the decisions, shared by the request plane's protocols and the stream helpers below --
def judge(
    secret: bytes | None, server_nonce: bytes, proof_message: bytes
) -> tuple[int, bytes, str]:
    """The server's answer to a client PROOF: (status, server proof, why it was refused).

    Raises ``HandshakeError`` when the bytes are not a PROOF at all.
    """
    version, auth, client_nonce, proof = unpack_proof(proof_message)
    if version != VERSION:
        reason = f"it speaks handshake version {version}, this server {VERSION}"
        return REJECTED_VERSION, NO_PROOF, reason
    if secret is None:
        return ACCEPTED, NO_PROOF, ""
    if auth != AUTH_HMAC_SHA256:
        return REJECTED_NO_SECRET, NO_PROOF, "it has no cluster secret"
    if not proofs_equal(client_proof(secret, server_nonce, client_nonce), proof):
        return REJECTED_WRONG_SECRET, NO_PROOF, "its cluster secret differs from ours"
    return ACCEPTED, server_proof(secret, server_nonce, client_nonce), ""


def hello_problem(version: int, auth: int, has_secret: bool) -> tuple[str, bool] | None:
    """What is wrong with a server's HELLO for this client: (problem, is it about the secret);
    None when the client should answer it."""
    if version != VERSION:
        return (
            f"speaks handshake version {version}, this process {VERSION}; run one servegrid "
            f"version on every node",
            False,
        )
    if auth == AUTH_NONE and has_secret:
        return (
            "runs without the cluster secret, and this process holds one: it cannot prove it "
            f"belongs to the cluster. Give every servegrid process the same {_SECRET_VARIABLES}",
            True,
        )
    return None


def verdict_problem(
    status: int,
    proof: bytes,
    secret: bytes | None,
    server_nonce: bytes,
    client_nonce: bytes,
) -> tuple[str, bool] | None:
    """What is wrong with the server's VERDICT: (problem, is it about the secret); None when
    the connection is accepted and, with a secret, the server proved it holds it."""
    if status == REJECTED_NO_SECRET:
        return f"requires the cluster secret and this process has none; {HOW_TO_SET}", True
    if status == REJECTED_WRONG_SECRET:
        return (
            "refused this process's cluster secret: the two hold different secrets. Give every "
            f"servegrid process the same {_SECRET_VARIABLES}",
            True,
        )
    if status != ACCEPTED:
        return (
            f"refused the handshake (status {status}); run one servegrid version on every node",
            False,
        )
    if secret is not None and not proofs_equal(
        server_proof(secret, server_nonce, client_nonce), proof
    ):
        return (
            "did not prove that it holds the cluster secret; it is not a member of this cluster",
            True,
        )
    return None


_SECRET_VARIABLES = f"{env.SERVEGRID_CLUSTER_SECRET_FILE} or {env.SERVEGRID_CLUSTER_SECRET}"


# -- the handshake over asyncio streams, for listeners other than the request plane's ------
class HandshakeRefusedError(ConnectionError):
    """The handshake failed; the message says why and, where the secret is at fault, what to
    set."""


async def accept_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes | None
) -> None:
    """The server's side on a fresh connection; raises ``HandshakeRefusedError`` (after
    sending the refusal) or ``asyncio.IncompleteReadError``. Bound it with a timeout."""
    server_nonce = new_nonce()
    writer.write(pack_hello(secret is not None, server_nonce))
    message = await reader.readexactly(PROOF.size)
    try:
        status, proof, reason = judge(secret, server_nonce, message)
    except HandshakeError as exc:
        raise HandshakeRefusedError(str(exc)) from None
    writer.write(pack_verdict(status, proof))
    if status != ACCEPTED:
        await writer.drain()
        raise HandshakeRefusedError(reason)


async def connect_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes | None,
    where: str,
) -> None:
    """The client's side; raises ``HandshakeRefusedError`` naming ``where`` (e.g. "the KV
    listener at HOST:PORT") or ``asyncio.IncompleteReadError``. Bound it with a timeout."""
    try:
        version, auth, server_nonce = unpack_hello(await reader.readexactly(HELLO.size))
    except HandshakeError as exc:
        raise HandshakeRefusedError(f"{where}: {exc}") from None
    problem = hello_problem(version, auth, secret is not None)
    if problem is not None:
        raise HandshakeRefusedError(f"{where} {problem[0]}")
    client_nonce = new_nonce()
    writer.write(pack_proof(secret, server_nonce, client_nonce))
    status, proof = unpack_verdict(await reader.readexactly(VERDICT.size))
    problem = verdict_problem(status, proof, secret, server_nonce, client_nonce)
    if problem is not None:
        raise HandshakeRefusedError(f"{where} {problem[0]}")
