"""A raw client of kvstore's wire protocol for the hostile-client tests: frames, the
HMAC-SHA256 handshake (stdlib only, so it also runs under another user's /usr/bin/python3),
and the few requests the attacks need. Written from the protocol's description in
Sources/KVCore (WireCodec, MasterProtocol, Authentication), not from kvstore's own code."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

MAGIC, VERSION = 0x5453564B, 3
HELLO, MOUNT, HEARTBEAT, GET, STATS, SEGMENT_INFO, LIST_KEYS, PROVE, LEAVE = 1, 2, 4, 8, 13, 14, 20, 21, 26
OK, ERROR, CHALLENGE = 100, 101, 114
# data plane (segment and KV servers)
D_HELLO, D_READ, D_WRITE, D_KV_READ, D_PROVE, D_OK, D_ERROR, D_CHALLENGE = 200, 201, 202, 204, 206, 210, 211, 213


def frame(kind: int, payload: bytes = b"", rid: int = 1) -> bytes:
    return struct.pack("<IHHII", MAGIC, VERSION, kind, rid, len(payload)) + payload


def lp(b: bytes) -> bytes:
    """A length-prefixed field."""
    return struct.pack("<I", len(b)) + b


def data_key(token: bytes) -> bytes:
    """The data plane's secret (segment and KV servers), derived from the cluster token."""
    return hmac.new(token, b"kvstore data plane", hashlib.sha256).digest()


def proof(token: bytes, role: str, cn: bytes, sn: bytes) -> bytes:
    return hmac.new(token, role.encode() + cn + sn, hashlib.sha256).digest()


class Raw:
    """One blocking connection; `call` sends a frame and reads the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.s = sock
        self.rid = 0

    @classmethod
    def tcp(cls, port: int, host: str = "127.0.0.1", timeout: float = 5) -> Raw:
        return cls(socket.create_connection((host, port), timeout=timeout))

    @classmethod
    def local(cls, name: str, timeout: float = 5) -> Raw:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect("\0" + name)
        return cls(s)

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.rid += 1
        self.s.sendall(frame(kind, payload, self.rid))

    def call_with_fd(self, kind: int, payload: bytes, fd: int) -> tuple[int, bytes]:
        """`call` with a descriptor attached to the frame (SCM_RIGHTS; local socket)."""
        self.rid += 1
        socket.send_fds(self.s, [frame(kind, payload, self.rid)], [fd])
        return self.read()

    def recv_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            b = self.s.recv(n - len(out))
            if not b:
                raise ConnectionError("closed by the server")
            out += b
        return out

    def read(self) -> tuple[int, bytes]:
        magic, version, kind, rid, length = struct.unpack("<IHHII", self.recv_exactly(16))
        assert (magic, version) == (MAGIC, VERSION)
        return kind, self.recv_exactly(length)

    def call(self, kind: int, payload: bytes = b"") -> tuple[int, bytes]:
        self.send(kind, payload)
        return self.read()

    def closed_by_peer(self, timeout: float = 8) -> bool:
        """True when the server closes (after any answer it sends first)."""
        self.s.settimeout(timeout)
        try:
            while True:
                b = self.s.recv(65536)
                if not b:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def authenticate(self, token: bytes, name: str = "raw", data_plane: bool = False) -> int:
        """The handshake; returns the answer's kind (OK for data plane, 102 welcome for the master)."""
        cn = os.urandom(32)
        kind, body = self.call(D_HELLO if data_plane else HELLO, lp(cn) if data_plane else lp(name.encode()) + lp(cn) + lp(b""))
        if kind != (D_CHALLENGE if data_plane else CHALLENGE):
            return kind
        (n,) = struct.unpack_from("<I", body, 0)
        sn = body[4:4 + n]
        kind, _ = self.call(D_PROVE if data_plane else PROVE, lp(proof(token, "kvstore client", cn, sn)))
        return kind

    def close(self) -> None:
        self.s.close()


def error_message(body: bytes) -> str:
    (n,) = struct.unpack_from("<I", body, 4)
    return body[8:8 + n].decode()


def read_token(port: int) -> bytes:
    d = os.environ.get("KVSTORE_RUNTIME_DIR") or (
        os.environ["XDG_RUNTIME_DIR"] + "/kvstore" if os.environ.get("XDG_RUNTIME_DIR") else f"/tmp/kvstore-{os.geteuid()}")
    with open(f"{d}/master-{port}.token", "rb") as f:
        return f.read().strip()


def local_socket_names(pid: int) -> list[str]:
    """Abstract Unix socket names of a master (as any local user sees them in /proc/net/unix)."""
    names = []
    with open("/proc/net/unix") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith("@kvstore-master.") and f".{pid}." in parts[7]:
                names.append(parts[7][1:])
    return names
