"""One fixed sequence of Mooncake Store calls, run by test_mooncake.py's parity test against
Mooncake Store itself and against kvstore.mooncake; prints the results as JSON lines."""

import json
import sys

import numpy as np

impl, addr = sys.argv[1], sys.argv[2]
if impl == "mooncake":
    from mooncake.store import MooncakeDistributedStore
else:
    from kvstore.mooncake import MooncakeDistributedStore

s = MooncakeDistributedStore()
out = []


def rec(name, *values):
    out.append([name, [v.hex() if isinstance(v, bytes) else [x.hex() if isinstance(x, bytes) else x for x in v]
                       if isinstance(v, list) else v for v in values]])


rec("health before", s.health_check())
rec("setup", s.setup("localhost", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "", addr))
rec("health", s.health_check())
rec("put", s.put("k", b"hello"), s.put("k", b"other"))
rec("get", s.get("k"), s.get("missing"))
rec("get_size", s.get_size("k"), s.get_size("missing"))
rec("is_exist", s.is_exist("k"), s.is_exist("missing"))
rec("remove", s.remove("k"), s.remove("k", True), s.remove("missing"))
rec("put_batch", s.put_batch(["a", "b"], [b"1", b"22"]), s.put_batch(["a", "c"], [b"x", b"33"]))
rec("get_batch", s.get_batch(["a", "nope", "c"]))
rec("batch_is_exist", s.batch_is_exist(["a", "nope"]))
rec("put_parts", s.put_parts("p", b"ab", b"cd"), s.get("p"))
buf = np.arange(4096, dtype=np.uint8)
dst = np.zeros(4096, dtype=np.uint8)
rec("register", s.register_buffer(buf.ctypes.data, 4096), s.register_buffer(dst.ctypes.data, 4096))
rec("put_from", s.put_from("z", buf.ctypes.data, 1000), s.put_from("z", buf.ctypes.data + 1, 10))
rec("get_into", s.get_into("z", dst.ctypes.data, 4096), s.get_into("z", dst.ctypes.data, 10),
    s.get_into("nope", dst.ctypes.data, 4096), bool((dst[:1000] == buf[:1000]).all()))
rec("batch_get_into", s.batch_get_into(["z", "nope"], [dst.ctypes.data, dst.ctypes.data], [4096, 4096]))
rec("batch_put_from", s.batch_put_from(["x", "y"], [buf.ctypes.data, buf.ctypes.data + 8], [4, 4]))
rec("existing", s.batch_put_from(["z", "n"], [buf.ctypes.data] * 2, [100, 100]),
    s.batch_put_from_multi_buffers(["z"], [[buf.ctypes.data]], [[100]]), s.put_parts("z", b"ab"))
rec("empty", s.put("e", b""), s.put("", b"x"))
rec("upsert", s.upsert("u", b"1"), s.upsert("u", b"22"), s.get("u"))
rec("remove_by_regex", s.remove_by_regex("^[abc]$"))
rec("batch_remove", s.batch_remove(["x", "nope"]))
# get_buffer / batch_get_buffer: the bytes (or None), and the handle's size
b = s.get_buffer("z")
rec("get_buffer", None if b is None else bytes(memoryview(b)).hex(), None if b is None else b.size(), s.get_buffer("nope") is None)
rec("batch_get_buffer", [None if h is None else bytes(memoryview(h)).hex() for h in s.batch_get_buffer(["x", "nope", "y"])])
# replica descriptors: how many, and that they are memory replicas
desc = s.batch_get_replica_desc(["z", "nope"])
rec("replica_desc", len(s.get_replica_desc("z")), [d.is_memory_replica() for d in s.get_replica_desc("z")],
    len(s.get_replica_desc("nope")), sorted(desc), [len(desc[k]) for k in sorted(desc)])
# ranged reads, buffer-major, into registered memory (Mooncake's documented example)
s.put("key1", bytes(range(40)))
s.put("key2", bytes(range(100, 140)))
r0 = np.zeros(32, dtype=np.uint8)
r1 = np.zeros(32, dtype=np.uint8)
s.register_buffer(r0.ctypes.data, 32)
s.register_buffer(r1.ctypes.data, 32)
rec("get_into_ranges", s.get_into_ranges([r0.ctypes.data, r1.ctypes.data], [["key1", "key2"], ["key2", "key1"]],
                                         [[[0, 20], [8]], [[4], [16]]], [[[1, 30], [2]], [[0], [10]]], [[[4, 3], [5]], [[6], [4]]]),
    r0.tobytes(), r1.tobytes())
# put sessions: reserve, write ranges in any order, end or revoke
src = np.arange(64, dtype=np.uint8)
rec("put_session_start", s.batch_put_session_start(["s1", "s2", "key1"], [32, 16, 8]))
rec("put_session_ranges", s.batch_put_from_multi_buffer_ranges(["s1", "s2"], [[src.ctypes.data + 16, src.ctypes.data],
                                                                            [src.ctypes.data + 40]], [[16, 16], [16]], [[16, 0], [0]]))
rec("put_session_invisible", s.is_exist("s1"))
rec("put_session_end", s.batch_put_session_end(["s1"]), s.batch_put_session_revoke(["s2"]), s.get("s1"), s.is_exist("s2"))
# get sessions: ranges of held objects into registered memory
rec("get_session_start", s.batch_get_session_start(["s1", "key2"]))
rec("get_session_ranges", s.batch_get_into_multi_buffer_ranges(["s1", "key2"], [[r0.ctypes.data, r0.ctypes.data + 8], [r1.ctypes.data]],
                                                                [[4, 4], [8]], [[0, 28], [32]]), r0[:12].tobytes(), r1[:8].tobytes())
rec("get_session_end", s.batch_get_session_end(["s1", "key2"]))
meta = np.frombuffer(b"META", dtype=np.uint8).copy()
rec("put_from_with_metadata", s.put_from_with_metadata("md", buf.ctypes.data, meta.ctypes.data, 6, 4), s.get("md"))
s.unregister_buffer(r0.ctypes.data)
s.unregister_buffer(r1.ctypes.data)
# copy and move tasks, extra segments: codes (ids and segment names differ by design)
rec("tasks", s.create_copy_task("missing", ["x"]), s.create_copy_task("z", ["no-such-segment"]),
    s.create_move_task("missing", "a", "b"), s.query_task((0, 0)), s.query_task((1, 2)))
extra = s.allocate_and_mount_segment(8 << 20)
rec("segments", extra["ret"], len(extra["segment_ids"]), s.unmount_and_free_segment(extra["segment_ids"]),
    s.unmount_and_free_segment(["no-such-segment"]), s.mount_segment("/dev/shm/kvstore-probe-no-such-file", 1 << 20))
rec("remove_all", s.remove_all())
rec("unregister", s.unregister_buffer(buf.ctypes.data), s.unregister_buffer(buf.ctypes.data))
rec("close", s.close())
print(json.dumps(out))
