"""Sessions that survive a partition, and fenced writers (issue 17, items 3 and 5).

A TCP relay stands between one client and the master: cutting it is a partition both sides
see (the master sees its connection close, the client sees its calls fail). The client must
come back with its session, segment and objects; a commit lost in the cut must be applied
by the resume. A writer paused past the master's write timeout must not copy into space the
master has given to another object."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import wire
from cluster import Master, wait_for

import kvstore


class Relay:
    """Forwards TCP connections to ``port`` on loopback. ``cut()`` closes every relayed
    connection; frames of a kind in ``drop`` (client to master) are swallowed, as if they
    were lost with the connection; frames of a kind in ``hold`` wait until ``release()`` (a
    slow network), and the frames behind them wait too."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.drop: set[int] = set()
        self.dropped: list[int] = []
        self.hold: set[int] = set()
        self.held: list[tuple[socket.socket, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"kvstore://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            m = socket.create_connection(("127.0.0.1", self.port))
            with self.lock:
                self.pairs.append((c, m))
            threading.Thread(target=self._frames, args=(c, m), daemon=True).start()
            threading.Thread(target=self._bytes, args=(m, c), daemon=True).start()

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        try:
            while data := src.recv(1 << 16):
                buf += data
                while len(buf) >= 16:
                    kind = struct.unpack_from("<H", buf, 6)[0]
                    length = struct.unpack_from("<I", buf, 12)[0]
                    if len(buf) < 16 + length:
                        break
                    frame, buf = buf[:16 + length], buf[16 + length:]
                    with self.lock:
                        if kind in self.drop:
                            self.dropped.append(kind)
                            continue
                        if kind in self.hold or any(d is dst for d, _ in self.held):
                            self.held.append((dst, frame))
                            continue
                    dst.sendall(frame)
        except OSError:
            pass
        self._close(src, dst)

    def _bytes(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self) -> None:
        """Sends the held frames, in order, and stops holding."""
        with self.lock:
            held, self.held, self.hold = self.held, [], set()
            for dst, frame in held:
                dst.sendall(frame)

    def cut(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for c, m in pairs:
            self._close(c, m)

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def master():
    with Master("--client-ttl", "5", "--write-timeout", "1") as m:
        yield m


@pytest.fixture
def relayed(master, monkeypatch):
    """A client that reaches the master only through a relay (on TCP: the local socket is
    turned off), and a reader connected directly."""
    monkeypatch.setenv("KVSTORE_MASTER_LOCAL", "0")
    token = wire.read_token(master.port).decode()
    relay = Relay(master.port)
    owner = kvstore.Store.connect(relay.url, segment_size=16 << 20, token=token)
    reader = kvstore.Store.connect(master.url, segment_size=0)
    yield relay, owner, reader
    reader.close()
    owner.close()
    relay.close()


def call_until_back(fn, timeout: float = 5):
    """``fn()`` once the client has reconnected (calls fail with TransferError until then)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except kvstore.TransferError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_a_partition_keeps_the_session_its_segment_and_its_objects(master, relayed):
    relay, owner, reader = relayed
    value = os.urandom(300_000)
    owner.put("kept", value)
    assert owner.exists("kept")            # (a round trip: the pipelined commit has passed the relay)
    relay.cut()
    # The master keeps the session: the object stays readable by others meanwhile.
    time.sleep(0.3)
    assert reader.get("kept") == value
    assert call_until_back(lambda: owner.get("kept")) == value
    st = owner.stats()
    assert st["sessions_resumed"] == 1 and st["master_reconnects"] == 1
    owner.put("after", b"y" * 5000)
    assert owner.exists("after")
    assert reader.get("after") == b"y" * 5000
    assert wait_for(lambda: "resumed its session" in "".join(master.log), 2)
    assert "objects lost" not in "".join(master.log)


def test_a_commit_lost_with_the_connection_is_applied_by_the_resume(master, relayed):
    relay, owner, reader = relayed
    relay.drop = {6}                       # putCommit frames vanish, as in a connection that breaks
    owner.put("late", b"z" * 4096)         # acknowledged: the commit went out pipelined
    assert wait_for(lambda: relay.dropped == [6], 2)
    relay.cut()
    relay.drop = set()
    assert not reader.exists("late")       # the master never saw the commit
    call_until_back(lambda: owner.exists("late"))
    assert owner.stats()["commits_resent"] == 1
    assert reader.get("late") == b"z" * 4096


def test_a_client_that_closes_leaves_at_once(master):
    a = kvstore.Store.connect(master.url, segment_size=8 << 20)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        a.put("gone", b"g" * 1000)
        assert b.exists("gone")
        a.close()
        assert not b.exists("gone")
    finally:
        b.close()


WRITER = """
import sys, kvstore
s = kvstore.Store.connect(sys.argv[1], segment_size=0)
print("ready", flush=True)
try:
    s.put("stale", b"\\xaa" * (3 << 20))
    print("stored", flush=True)
except kvstore.TransferError as e:
    print("refused", e, flush=True)
s.close()
"""


def test_a_writer_paused_past_the_write_timeout_never_overwrites_the_next_object(master):
    """The writer pauses 2 s between the master's answer and its copy; the master aborts the
    write after 1 s and gives its space to a new object. The writer's deadline stops it."""
    owner = kvstore.Store.connect(master.url, segment_size=4 << 20)
    try:
        w = subprocess.Popen([sys.executable, "-c", WRITER, master.url], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "KVSTORE_TEST_WRITE_PAUSE_US": "2000000"})
        assert w.stdout.readline().strip() == "ready"
        time.sleep(0.5)                    # its write has begun (it is paused before the copy)
        fresh = b"\x55" * (3 << 20)
        end = time.monotonic() + 5
        refused = 0
        while True:                        # no room until the stale write's space is freed
            try:
                owner.put("fresh", fresh)
                break
            except kvstore.NoSpaceError:
                refused += 1
                assert time.monotonic() < end, "the abandoned write's space was never freed"
                time.sleep(0.05)
        assert refused > 0, "the writer's space was free too early"
        out, _ = w.communicate(timeout=20)
        assert out.startswith("refused") and "write timeout" in out, out
        time.sleep(0.2)
        assert owner.get("fresh") == fresh, "a fenced writer copied into another object's space"
        assert not owner.exists("stale")
    finally:
        owner.close()


def test_a_writer_on_another_host_frozen_mid_copy_never_overwrites_the_next_object(netns):
    """The writer (another network namespace: its copy goes over TCP to the owner's segment
    server) sends half its bytes, then freezes 2.5 s; the master aborts the write after 1 s and
    gives its space to a new object. The segment server refuses the bytes that arrive after the
    write's deadline, so the new object keeps its own."""
    from test_cluster import TOKEN
    with Master("--token", TOKEN, "--client-ttl", "5", "--write-timeout", "1", host="10.213.0.1") as m:
        owner = kvstore.Store.connect(m.url, segment_size=4 << 20, token=TOKEN)
        try:
            w = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", WRITER, m.url], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "KVSTORE_MASTER_TOKEN": TOKEN,
                                                 "KVSTORE_TEST_WRITE_STALL_US": "2500000"})
            assert w.stdout.readline().strip() == "ready"
            time.sleep(0.5)                    # half its bytes are in the owner's segment; it is frozen
            fresh = b"\x55" * (3 << 20)
            end = time.monotonic() + 5
            while True:                        # room once the master aborted the frozen write
                try:
                    owner.put("fresh", fresh)
                    break
                except kvstore.NoSpaceError:
                    assert time.monotonic() < end, "the abandoned write's space was never freed"
                    time.sleep(0.05)
            out, _ = w.communicate(timeout=20)
            assert out.startswith("refused"), out
            time.sleep(0.2)
            assert owner.get("fresh") == fresh, "a writer's late bytes landed in another object's space"
            assert not owner.exists("stale")
        finally:
            owner.close()
