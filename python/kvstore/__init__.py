"""kvstore: a KV-cache object store for LLM serving.

``kvstore.Store()`` is an embedded store in this process. See README.md for the API.
"""

from . import _errors
from ._errors import *  # noqa: F403 - the exception hierarchy; listed in _errors.__all__
from ._native import MAX_KEY_BYTES
from ._native import devices as _devices
from ._native import rdma_info as _rdma_info
from ._sizes import parse_size
from ._store import DEFAULT_SEGMENT_SIZE, Store

__version__ = "0.1.0"


def devices(refresh: bool = False) -> list[str]:
    """Devices kvstore can move memory on, host first: ``["cpu:0", "cuda:0", ...]``.

    Probed once per process (CUDA through the driver library, loaded at run time);
    ``refresh=True`` probes again.
    """
    return _devices(bool(refresh))


def rdma() -> dict:
    """RDMA as this process found it: ``{"library": bool, "in_use": bool, "reason": str,
    "devices": [{"name", "port", "active", "link_layer", "mtu"}, ...]}``.

    libibverbs is loaded at run time (``KVSTORE_IBVERBS_LIBRARY`` names another file,
    ``KVSTORE_RDMA=0`` turns RDMA off). Connected stores use RDMA to reach peers on other
    hosts when both sides have an active device (``in_use``), TCP otherwise; ``reason`` says
    why not.
    """
    head, *lines = _rdma_info().split("\n")
    library, in_use, reason = head.split("\t", 2)
    devices = []
    for line in lines:
        name, port, active, link, mtu = line.split("\t")
        devices.append({"name": name, "port": int(port), "active": active == "1", "link_layer": link, "mtu": int(mtu)})
    return {"library": library == "1", "in_use": in_use == "1", "reason": reason, "devices": devices}


__all__ = ["Store", "devices", "rdma", "parse_size", "MAX_KEY_BYTES", "DEFAULT_SEGMENT_SIZE", *_errors.__all__]
