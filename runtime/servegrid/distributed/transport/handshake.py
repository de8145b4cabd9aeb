"""The request-plane handshake, defined once: before any frame, both ends prove they hold the
cluster secret (``distributed/secret.py``) without sending it.

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

import hashlib
import hmac
import os
import struct

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
