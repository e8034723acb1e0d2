"""Read-your-writes across clients (issue 17, item 4): a put that returned is seen by a get
that starts after it on any client, even while its pipelined commit is still on the wire;
the master holds such a read back (``--read-wait``) until the commit arrives."""

from __future__ import annotations

import os
import threading
import time

import pytest
import wire
from cluster import Master
from test_sessions import Relay

import kvstore


def relayed_pair(master: Master, monkeypatch) -> tuple[Relay, kvstore.Store, kvstore.Store]:
    monkeypatch.setenv("KVSTORE_MASTER_LOCAL", "0")
    relay = Relay(master.port)
    writer = kvstore.Store.connect(relay.url, segment_size=8 << 20, token=wire.read_token(master.port).decode())
    reader = kvstore.Store.connect(master.url, segment_size=0)
    return relay, writer, reader


@pytest.mark.parametrize("how", ["get", "exists", "get_batch"])
def test_a_read_after_a_put_waits_for_its_commit_on_the_wire(monkeypatch, how):
    with Master("--read-wait", "5") as master:
        relay, writer, reader = relayed_pair(master, monkeypatch)
        try:
            v = os.urandom(10_000)
            relay.hold = {6}                       # the commit is slow to arrive
            writer.put("k", v)                     # returned: its commit is pipelined
            out: dict[str, object] = {}

            def read() -> None:
                t0 = time.monotonic()
                if how == "get":
                    out["value"] = reader.get("k")
                elif how == "exists":
                    out["value"] = v if reader.exists("k") else None
                else:
                    out["value"] = reader.get_batch(["k"])[0]
                out["took"] = time.monotonic() - t0

            t = threading.Thread(target=read)
            t.start()
            time.sleep(0.4)
            assert t.is_alive(), "the read did not wait for the commit"
            relay.release()
            t.join(timeout=5)
            assert out["value"] == v and out["took"] >= 0.4
        finally:
            reader.close()
            writer.close()
            relay.close()


def test_the_wait_is_bounded(monkeypatch):
    with Master("--read-wait", "0.2") as master:
        relay, writer, reader = relayed_pair(master, monkeypatch)
        try:
            relay.hold = {6}
            writer.put("k", b"v" * 100)
            t0 = time.monotonic()
            assert not reader.exists("k")          # the commit never came within the wait
            assert 0.15 < time.monotonic() - t0 < 2
            relay.release()
            assert writer.exists("k") and reader.get("k") == b"v" * 100
        finally:
            reader.close()
            writer.close()
            relay.close()
