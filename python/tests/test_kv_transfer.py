"""Prefill→decode KV transfer (issue 6): layouts registered by descriptor and validated,
published and fetched by node id, blocks pulled and pushed with contiguous runs coalesced,
per-block and aggregated executors; in one process and across processes (same host, and
TCP between different host identities). Every process and server started is stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cluster import Master
from kv_util import descriptors, layout_arrays

import kvstore

LAYERS, BLOCKS, BPB = 3, 64, 1024
PEER = str(Path(__file__).with_name("kv_peer.py"))


@pytest.fixture
def master():
    with Master() as m:
        yield m


def make(store: kvstore.Store, node: str, seed: int, layers: int = LAYERS, blocks: int = BLOCKS, bpb: int = BPB,
         kinds: tuple[str, ...] = ("key", "value")) -> list[np.ndarray]:
    arrays = layout_arrays(layers, blocks, bpb, seed, len(kinds))
    store.register_kv_layout(node, descriptors(arrays, bpb, kinds))
    return arrays


def moved(dst: list[np.ndarray], src: list[np.ndarray], src_ids, dst_ids, layers=None, kinds: int = 2) -> list[np.ndarray]:
    """What `dst` holds after copying blocks src_ids -> dst_ids of the chosen layers."""
    out = [a.copy() for a in dst]
    chosen = range(len(dst) // kinds) if layers is None else layers
    for layer in chosen:
        for k in range(kinds):
            i = layer * kinds + k
            for s, d in zip(src_ids, dst_ids):
                out[i][d] = src[i][s]
    return out


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def runs(src, dst) -> int:
    n = 0
    for i, (s, d) in enumerate(zip(src, dst)):
        if i == 0 or s != src[i - 1] + 1 or d != dst[i - 1] + 1:
            n += 1
    return n


def block_lists(shape: str, seed: int = 7) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    if shape == "random":
        return [int(x) for x in rng.permutation(BLOCKS)[:24]], [int(x) for x in rng.permutation(BLOCKS)[:24]]
    if shape == "sorted":
        return list(range(10, 30)), list(range(40, 60))
    # partly contiguous: runs of 4, 1, 2 and 2
    return [5, 6, 7, 8, 20, 30, 31, 2, 3], [50, 51, 52, 53, 10, 60, 61, 0, 1]


# ---- registration ----

def test_layout_round_trips_sorted_by_layer_and_kind():
    with kvstore.Store("4MiB") as s:
        arrays = layout_arrays(2, 8, 256, 1, kinds=3)
        ds = descriptors(arrays, 256, ("key", "value", "index"))
        s.register_kv_layout("n", list(reversed(ds)))
        got = s.get_registered_memory("n")
        assert got == [dict(d, location="cpu") for d in ds]
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get_registered_memory("other")


def _bad_layouts(arrays):
    ds = descriptors(arrays, BPB)
    d0 = ds[0]
    return {
        "overlap": (ds + [dict(d0, layer=LAYERS, kind="key")] + [dict(ds[1], layer=LAYERS)], "overlaps"),
        "partial block": ([dict(d0, length=d0["length"] - 1)] + ds[1:], "not a multiple"),
        "duplicate": (ds + [dict(d0)], "each (layer, kind) may appear once"),
        "missing layer": ([d for d in ds if d["layer"] != 1], "layer 1 has no buffer"),
        "missing kind": ([d for d in ds if not (d["layer"] == 2 and d["kind"] == "value")], "layer 2 has no VALUE"),
        "no device": ([dict(d0, location="cuda:7")] + ds[1:], "no device 'cuda:7'"),
        "bad location": ([dict(d0, location="cpu:x")] + ds[1:], "bad device index"),
        "zero block size": ([dict(d0, bytes_per_block=0)] + ds[1:], "bytes per block"),
        "empty buffer": ([dict(d0, length=0)] + ds[1:], "length"),
        "null address": ([dict(d0, address=0)] + ds[1:], "address"),
        "empty": ([], "at least one"),
        "missing field": ([{k: v for k, v in d0.items() if k != "bytes_per_block"}] + ds[1:], "lacks bytes_per_block"),
        "unknown field": ([dict(d0, stride=4)] + ds[1:], "unknown fields stride"),
        "unknown kind": ([dict(d0, kind="query")] + ds[1:], "'key', 'value' or 'index'"),
        "negative": ([dict(d0, address=-5)] + ds[1:], "out of range"),
    }


@pytest.mark.parametrize("case", list(_bad_layouts(layout_arrays(LAYERS, BLOCKS, BPB, 0))))
def test_bad_layouts_are_refused_naming_the_descriptor_and_keep_the_old_one(case):
    with kvstore.Store("4MiB") as s:
        arrays = make(s, "n", 1)
        before = s.get_registered_memory("n")
        bad, text = _bad_layouts(arrays)[case]
        with pytest.raises(kvstore.InvalidArgumentError, match=re.escape(text)):
            s.register_kv_layout("n", bad)
        assert s.get_registered_memory("n") == before


@pytest.mark.parametrize("bad, exc", [
    ("not a list", kvstore.ArgumentTypeError), ([1, 2], kvstore.ArgumentTypeError),
    ([{"layer": 0, "kind": 1, "address": 4096, "length": 4096, "bytes_per_block": 4096}], kvstore.ArgumentTypeError),
    ([{"layer": "0", "kind": "key", "address": 4096, "length": 4096, "bytes_per_block": 4096}], kvstore.ArgumentTypeError),
    ([{"layer": True, "kind": "key", "address": 4096, "length": 4096, "bytes_per_block": 4096}], kvstore.ArgumentTypeError),
    ([{"layer": 0, "kind": "key", "address": 4096, "length": 4096, "bytes_per_block": 4096, "location": 0}], kvstore.ArgumentTypeError),
])
def test_descriptor_types_are_checked(bad, exc):
    with kvstore.Store("4MiB") as s:
        with pytest.raises(exc):
            s.register_kv_layout("n", bad)
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get_registered_memory("n")


@pytest.mark.parametrize("node", ["", "x" * 300, "a\0b"])
def test_bad_node_ids(node):
    with kvstore.Store("4MiB") as s:
        with pytest.raises(kvstore.InvalidArgumentError):
            make(s, node, 1)
    with kvstore.Store("4MiB") as s, pytest.raises(kvstore.ArgumentTypeError):
        s.register_kv_layout(5, [])


def test_another_client_cannot_take_a_node_id_and_a_leaving_client_withdraws_it(master):
    a = kvstore.Store.connect(master.url, segment_size=0)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        make(a, "prefill-0", 1)
        with pytest.raises(kvstore.ObjectExistsError):
            make(b, "prefill-0", 2)
        make(a, "prefill-0", 3)                        # the owner may replace it
        assert len(b.get_registered_memory("prefill-0")) == 2 * LAYERS
        a.unregister_kv_layout()
        with pytest.raises(kvstore.ObjectNotFoundError):
            b.get_registered_memory("prefill-0")
        a.unregister_kv_layout()                       # none: not an error
        make(a, "prefill-0", 4)
        a.close()
        with pytest.raises(kvstore.ObjectNotFoundError):
            b.get_registered_memory("prefill-0")       # gone with its client
    finally:
        a.close()
        b.close()


# ---- pull and push in one process ----

@pytest.mark.parametrize("shape", ["random", "sorted", "partly"])
@pytest.mark.parametrize("executor", ["per_block", "aggregated"])
def test_pull_and_push_between_two_clients_in_one_process(master, shape, executor):
    a = kvstore.Store.connect(master.url, segment_size=0)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        src, dst = make(a, "prefill", 1), make(b, "decode", 2)
        s_ids, d_ids = block_lists(shape)
        want = moved(dst, src, s_ids, d_ids)
        n = b.pull_kv_blocks("prefill", s_ids, d_ids, executor=executor)
        assert same(dst, want)
        assert n == runs(s_ids, d_ids) * LAYERS * 2    # one memcpy per run and buffer
        want_src = moved(src, dst, d_ids[:5], s_ids[:5], layers=[2])
        b.push_kv_blocks("prefill", d_ids[:5], s_ids[:5], layers=[2], executor=executor)
        assert same(src, want_src)
    finally:
        a.close()
        b.close()


def test_embedded_store_copies_blocks_within_its_own_layout():
    with kvstore.Store("4MiB") as s:
        arrays = make(s, "self", 5)
        want = moved(arrays, [a.copy() for a in arrays], [0, 1, 2], [10, 11, 12], layers=[0, 2])
        assert s.pull_kv_blocks("self", [0, 1, 2], [10, 11, 12], layers=[0, 2]) == 2 * 2
        assert same(arrays, want)


def test_contiguous_lists_coalesce_into_one_transfer_per_buffer(master):
    a = kvstore.Store.connect(master.url, segment_size=0)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        src, dst = make(a, "p", 1), make(b, "d", 2)
        assert b.pull_kv_blocks("p", range(BLOCKS), range(BLOCKS)) == LAYERS * 2
        assert same(dst, src)
        assert b.pull_kv_blocks("p", [3, 2, 1], [3, 2, 1], layers=[0]) == 3 * 2   # descending: no runs
    finally:
        a.close()
        b.close()


def _pull_errors(store: kvstore.Store):
    return [
        (lambda: store.pull_kv_blocks("p", [0, 1], [0]), kvstore.InvalidArgumentError, "equally long"),
        (lambda: store.pull_kv_blocks("p", [0, 1], [5, 5]), kvstore.InvalidArgumentError, "listed twice"),
        (lambda: store.pull_kv_blocks("p", [BLOCKS], [0]), kvstore.InvalidArgumentError, "source block .* out of range"),
        (lambda: store.pull_kv_blocks("p", [0], [-1]), kvstore.InvalidArgumentError, "destination block -1 is out of range"),
        (lambda: store.pull_kv_blocks("p", [0], [0], layers=[LAYERS]), kvstore.InvalidArgumentError, "layer 3 is out of range"),
        (lambda: store.pull_kv_blocks("p", [0], [0], layers=[1, 1]), kvstore.InvalidArgumentError, "listed twice"),
        (lambda: store.pull_kv_blocks("p", [0], [0], executor="fast"), kvstore.InvalidArgumentError, "per_block"),
        (lambda: store.pull_kv_blocks("p", [0], [0], executor=1), kvstore.ArgumentTypeError, "executor"),
        (lambda: store.pull_kv_blocks("p", [0.5], [0]), kvstore.ArgumentTypeError, "ints"),
        (lambda: store.pull_kv_blocks("p", [True], [0]), kvstore.ArgumentTypeError, "ints"),
        (lambda: store.pull_kv_blocks("p", "01", [0]), kvstore.ArgumentTypeError, "sequence"),
        (lambda: store.pull_kv_blocks("p", [2**70], [0]), kvstore.InvalidArgumentError, "out of range"),
        (lambda: store.pull_kv_blocks("p", np.array([0.0]), [0]), kvstore.ArgumentTypeError, "integers"),
        (lambda: store.pull_kv_blocks("nobody", [0], [0]), kvstore.ObjectNotFoundError, "nobody"),
        (lambda: store.pull_kv_blocks(3, [0], [0]), kvstore.ArgumentTypeError, "peer"),
    ]


def test_every_pull_rule_is_checked_before_any_byte_moves(master):
    a = kvstore.Store.connect(master.url, segment_size=0)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        src = make(a, "p", 1)
        dst = make(b, "d", 2)
        before = [x.copy() for x in dst]
        for call, exc, text in _pull_errors(b):
            with pytest.raises(exc, match=text):
                call()
        assert same(dst, before) and same(src, layout_arrays(LAYERS, BLOCKS, BPB, 1))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("case", ["layers", "kinds", "block size"])
def test_layouts_that_do_not_match_are_refused(master, case):
    a = kvstore.Store.connect(master.url, segment_size=0)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        if case == "layers":
            make(a, "p", 1, layers=LAYERS + 1)
            text = "same number"
        elif case == "kinds":
            make(a, "p", 1, kinds=("key", "index"))
            text = "same"
        else:
            make(a, "p", 1, bpb=BPB * 2)
            text = "bytes per block"
        dst = make(b, "d", 2)
        before = [x.copy() for x in dst]
        with pytest.raises(kvstore.InvalidArgumentError, match=text):
            b.pull_kv_blocks("p", [0], [0])
        assert same(dst, before)
    finally:
        a.close()
        b.close()


def test_moving_blocks_needs_a_layout_of_ones_own(master):
    with kvstore.Store.connect(master.url, segment_size=0) as a, kvstore.Store.connect(master.url, segment_size=0) as b:
        make(a, "p", 1)
        with pytest.raises(kvstore.InvalidArgumentError, match="no KV layout"):
            b.pull_kv_blocks("p", [0], [0])


def test_closed_store_refuses_kv_calls():
    s = kvstore.Store("4MiB")
    s.close()
    for call in (lambda: make(s, "n", 1), s.unregister_kv_layout, lambda: s.get_registered_memory("n"),
                 lambda: s.pull_kv_blocks("n", [0], [0]), lambda: s.push_kv_blocks("n", [0], [0])):
        with pytest.raises(kvstore.StoreClosedError):
            call()


# ---- across processes ----

class Peer:
    """kv_peer.py: a layout of seed `seed` published as `node` in another process."""

    def __init__(self, url: str, node: str, seed: int, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.out = tmp / f"{node}.npy"
        self.proc = subprocess.Popen([sys.executable, PEER, url, node, str(LAYERS), str(BLOCKS), str(BPB), str(seed), str(self.out)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        assert self.proc.stdout.readline().strip() == "ready"
        self.arrays = layout_arrays(LAYERS, BLOCKS, BPB, seed)

    def finish(self) -> list[np.ndarray]:
        """Stops the peer; returns its buffers as they were at the end."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0
        return list(np.load(self.out))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("route", ["same host", "tcp"])
@pytest.mark.parametrize("executor", ["per_block", "aggregated"])
def test_pull_and_push_across_processes(master, tmp_path, route, executor):
    env = {"KVSTORE_HOST_ID": "kv-peer-host"} if route == "tcp" else None
    peer = Peer(master.url, "prefill", 11, tmp_path, env)
    me = kvstore.Store.connect(master.url, segment_size=0)
    try:
        dst = make(me, "decode", 12)
        net0 = me.stats()["network_bytes"]
        for shape in ("random", "sorted", "partly"):
            s_ids, d_ids = block_lists(shape)
            want = moved(dst, peer.arrays, s_ids, d_ids)
            n = me.pull_kv_blocks("prefill", s_ids, d_ids, executor=executor)
            assert same(dst, want), shape
            copies = runs(s_ids, d_ids) * LAYERS * 2
            assert n == (copies if executor == "per_block" else -(-copies // 1024))
        moved_over_tcp = me.stats()["network_bytes"] > net0
        assert moved_over_tcp == (route == "tcp")
        s_ids, d_ids = block_lists("partly")
        expected_peer = moved(peer.arrays, dst, d_ids, s_ids, layers=[0, 1])
        me.push_kv_blocks("prefill", d_ids, s_ids, layers=[0, 1], executor=executor)
        assert same(peer.finish(), expected_peer)
    finally:
        peer.kill()
        me.close()


def test_a_peer_refuses_ranges_outside_its_published_buffers(master, tmp_path):
    """The segment server checks every range against the buffers it published."""
    peer = Peer(master.url, "prefill", 11, tmp_path, {"KVSTORE_HOST_ID": "kv-peer-host"})
    me = kvstore.Store.connect(master.url, segment_size=0)
    try:
        dst = make(me, "decode", 12)
        peer_layout = me.get_registered_memory("prefill")
        me.pull_kv_blocks("prefill", [1], [1])
        # Withdrawn by its owner while this client still knows where it was: refused, unchanged.
        peer.proc.stdin.close()
        peer.proc.wait(timeout=20)
        with pytest.raises((kvstore.ObjectNotFoundError, kvstore.TransferError)):
            me.pull_kv_blocks("prefill", [2], [2])
        assert peer_layout[0]["length"] == BLOCKS * BPB
        assert np.array_equal(dst[0][2], layout_arrays(LAYERS, BLOCKS, BPB, 12)[0][2])
    finally:
        peer.kill()
        me.close()


def test_a_layout_is_published_again_after_a_master_restart():
    import signal

    from cluster import wait_for

    m = Master("--client-ttl", "2")
    a = kvstore.Store.connect(m.url, segment_size=0)
    b = None
    try:
        src = make(a, "prefill", 1)
        port = m.port
        m.stop(signal.SIGKILL)
        m = Master("--client-ttl", "2", port=port)

        def reconnected() -> bool:
            try:
                a.exists("x")
                return True
            except kvstore.TransferError:
                return False

        assert wait_for(reconnected, 10, 0.1)
        b = kvstore.Store.connect(m.url, segment_size=0)
        dst = make(b, "decode", 2)
        assert len(b.get_registered_memory("prefill")) == 2 * LAYERS
        b.pull_kv_blocks("prefill", [1, 2], [3, 4])
        assert same(dst, moved(layout_arrays(LAYERS, BLOCKS, BPB, 2), src, [1, 2], [3, 4]))
    finally:
        a.close()
        if b is not None:
            b.close()
        m.stop()


def test_concurrent_pulls_and_pushes_from_many_threads(master, tmp_path):
    """Threads of one client pull disjoint destination blocks while others push into the
    peer: every byte lands where it should."""
    import threading

    peer = Peer(master.url, "prefill", 11, tmp_path)
    me = kvstore.Store.connect(master.url, segment_size=0)
    try:
        dst = make(me, "decode", 12)
        original = [a.copy() for a in dst]
        errors: list[BaseException] = []

        def puller(t: int) -> None:
            try:
                ids = list(range(t * 8, t * 8 + 8))
                for _ in range(20):
                    me.pull_kv_blocks("prefill", ids, ids, executor=("per_block", "aggregated")[t % 2])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def pusher(t: int) -> None:
            try:
                ids = [40 + t * 4 + i for i in range(4)]
                for _ in range(20):
                    me.push_kv_blocks("prefill", ids, ids, layers=[1], executor="aggregated")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=puller, args=(t,)) for t in range(4)]
        threads += [threading.Thread(target=pusher, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        pulled = list(range(32))
        assert same(dst[:], moved(original, peer.arrays, pulled, pulled))  # pushes do not touch blocks 0-31
        theirs = peer.finish()
        pushed = list(range(40, 56))
        assert same(theirs, moved(peer.arrays, original, pushed, pushed, layers=[1]))
    finally:
        peer.kill()
        me.close()


def test_bad_arguments_of_every_kv_call_leave_everything_unchanged(master):
    a = kvstore.Store.connect(master.url, segment_size=0)
    b = kvstore.Store.connect(master.url, segment_size=0)
    try:
        src, dst = make(a, "p", 1), make(b, "d", 2)
        before_src, before_dst = [x.copy() for x in src], [x.copy() for x in dst]
        published = b.get_registered_memory("p")
        for call, exc in [
            (lambda: b.get_registered_memory(5), kvstore.ArgumentTypeError),
            (lambda: b.get_registered_memory(""), kvstore.InvalidArgumentError),
            (lambda: b.get_registered_memory("x" * 300), kvstore.InvalidArgumentError),
            (lambda: b.unregister_kv_layout("d"), TypeError),
            (lambda: b.pull_kv_blocks("p", [0], [0], layers="01"), kvstore.ArgumentTypeError),
            (lambda: b.pull_kv_blocks("p", [0], [0], layers=[1.0]), kvstore.ArgumentTypeError),
            (lambda: b.pull_kv_blocks("p", [0], [0], layers=[-1]), kvstore.InvalidArgumentError),
            (lambda: b.pull_kv_blocks("p", [0], [0], layers=[]), kvstore.InvalidArgumentError),
            (lambda: b.push_kv_blocks("p", [0, 1], [0]), kvstore.InvalidArgumentError),
            (lambda: b.push_kv_blocks("p", [0], [BLOCKS]), kvstore.InvalidArgumentError),
            (lambda: b.push_kv_blocks("p", [0, 1], [7, 7]), kvstore.InvalidArgumentError),
            (lambda: b.push_kv_blocks("p", [0], [0], executor="all"), kvstore.InvalidArgumentError),
            (lambda: b.push_kv_blocks("nobody", [0], [0]), kvstore.ObjectNotFoundError),
            (lambda: b.push_kv_blocks("p", None, [0]), kvstore.ArgumentTypeError),
        ]:
            with pytest.raises(exc):
                call()
        assert same(src, before_src) and same(dst, before_dst)
        assert b.get_registered_memory("p") == published
    finally:
        a.close()
        b.close()
