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
rec("remove_all", s.remove_all())
rec("unregister", s.unregister_buffer(buf.ctypes.data), s.unregister_buffer(buf.ctypes.data))
rec("close", s.close())
print(json.dumps(out))
