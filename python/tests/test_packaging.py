"""The extension is one abi3 shared object that needs only libc, libm, libstdc++, libgcc_s."""

import shutil
import subprocess
from pathlib import Path

import pytest

import kvstore
from kvstore import _native

SO = Path(_native.__file__)


def test_extension_is_stable_abi():
    assert SO.name == "_native.abi3.so"


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd not installed")
def test_extension_links_only_the_c_runtime():
    out = subprocess.run(["ldd", str(SO)], capture_output=True, text=True, check=True).stdout
    allowed = ("linux-vdso", "libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux")
    libs = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert libs and all(lib.startswith(allowed) or "ld-linux" in lib for lib in libs), libs
    for forbidden in ("ibverbs", "numa", "cuda", "swift", "python"):
        assert forbidden not in out


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm not installed")
def test_extension_exports_only_pyinit():
    out = subprocess.run(["nm", "-D", "--defined-only", str(SO)], capture_output=True, text=True, check=True).stdout
    exported = [line.split()[-1] for line in out.splitlines() if line.split()[1] in "TDBRVW"]
    assert exported == ["PyInit__native"]


def test_typing_files_ship():
    pkg = Path(kvstore.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_native.pyi").exists()


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_device_kinds_are_registered_in_the_extension():
    # Each device kind places one 8-byte record (a function pointer) in this section; the
    # registry reads it at run time. The extension links two kinds: the host and CUDA.
    out = subprocess.run(["readelf", "-W", "-S", str(SO)], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if "kvstore_accelerators" in line]
    assert rows, "no kvstore_accelerators section"
    name_at = rows[0].index("kvstore_accelerators")
    size = int(rows[0][name_at + 4], 16)
    assert size == 16
    assert kvstore.devices()[0] == "cpu:0"


def test_console_script_runs_the_command_line():
    # pip installs a `kvstore` script next to the interpreter (kvstore demo, bench, master).
    import sys
    script = Path(sys.executable).parent / "kvstore"
    if not script.exists():
        pytest.skip("kvstore is not pip-installed in this environment")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: kvstore" in out.stdout
    for command in ("demo", "bench", "master"):
        assert command in out.stdout
