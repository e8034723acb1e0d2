"""A KV-cache holder in its own process (test_kv_transfer.py): connects to a master, fills a
layout of `layers` x (key, value) buffers of `blocks` x `bpb` bytes with data from `seed`,
publishes it as `node`, prints "ready", and when its stdin closes saves the buffers to
`out` (a .npy file) so that pushes into it can be checked."""

import sys

import numpy as np
from kv_util import descriptors, layout_arrays

import kvstore

url, node, layers, blocks, bpb, seed, out = sys.argv[1:8]
store = kvstore.Store.connect(url, segment_size=0)
arrays = layout_arrays(int(layers), int(blocks), int(bpb), int(seed))
store.register_kv_layout(node, descriptors(arrays, int(bpb)))
print("ready", flush=True)
sys.stdin.read()
np.save(out, np.stack(arrays))
store.close()
