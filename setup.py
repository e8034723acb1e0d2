"""Builds kvstore's native extension with SwiftPM.

`swift build -c release --product _native` links the Swift core and the C extension into one
shared library (Swift standard library linked statically, only PyInit__native exported); it
is copied into the package as `_native.abi3.so` (stable ABI, CPython >= 3.11).
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def swift_build_command() -> tuple[list[str], dict[str, str]]:
    """The swift build command line and environment for the running interpreter's headers."""
    env = dict(os.environ)
    libpc = sysconfig.get_config_var("LIBPC")
    if libpc:
        env["PKG_CONFIG_PATH"] = os.pathsep.join(p for p in (libpc, env.get("PKG_CONFIG_PATH")) if p)
    include = sysconfig.get_paths()["include"]
    cmd = ["swift", "build", "-c", "release", "--product", "_native", "-Xcc", f"-I{include}"]
    return cmd, env


class SwiftBuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmd, env = swift_build_command()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        bin_path = subprocess.run(cmd + ["--show-bin-path"], cwd=ROOT, env=env, check=True,
                                  capture_output=True, text=True).stdout.strip()
        built = Path(bin_path) / "lib_native.so"
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
        os.chmod(target, 0o755)


setup(
    ext_modules=[Extension("kvstore._native", sources=[], py_limited_api=True)],
    cmdclass={"build_ext": SwiftBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
