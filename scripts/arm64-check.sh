#!/usr/bin/env bash
# The arm64 (Raspberry Pi 5 class) check, from a clean Debian x86-64 machine, as root:
#
#   sudo scripts/arm64-check.sh
#
# Makes an arm64 Debian bookworm root (debootstrap + qemu-user-static), cross-compiles the
# llama.cpp inside the llama-cpp-python 0.3.36 sdist for a Pi 5 CPU, installs edgeguard's
# dependencies from their aarch64 wheels inside the root, then runs the same verdicts on x86
# and under emulation of a Cortex-A76 (scripts/arm64_compare.py), `edgeguard doctor`, and the
# tests that need no torch. Everything it builds is cached in $EDGEGUARD_ARM64_CACHE
# (default ~/.cache/edgeguard-arm64), so a rerun only redoes the checks. It prints one line
# per step; on any failure, difference beyond tolerance or crash it exits 1 and its last
# line names the step (the step's log is in the cache's logs/ folder).
#
# Environment: EDGEGUARD_ARM64_CACHE (cache folder), EDGEGUARD_X86_PYTHON (the x86 Python with
# edgeguard and its test extras; default: the repo's .venv, else a venv made in the cache),
# EDGEGUARD_ARM64_JOBS (build jobs, default 2), EDGEGUARD_ARM64_QEMU_CPU (default cortex-a76:
# the Pi 5's core; "max" enables every feature qemu has), EDGEGUARD_DEBIAN_MIRROR (default:
# this machine's own Debian mirror from /etc/apt).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGEGUARD_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeguard-arm64}
JOBS=${EDGEGUARD_ARM64_JOBS:-2}
QEMU_CPU_MODEL=${EDGEGUARD_ARM64_QEMU_CPU:-cortex-a76}
LLAMA_CPP_VERSION=0.3.36
ARM_ARCH=armv8.2-a+dotprod+fp16  # Raspberry Pi 5 (Cortex-A76): dot product and fp16, no i8mm
ARM_PACKAGES="numpy onnxruntime gguf jinja2 click huggingface-hub typing-extensions diskcache
platformdirs tqdm onnx pytest hypothesis setuptools>=68 wheel"
# Tests that need neither torch nor a checkpoint that only torch can build. The converted
# fixtures they load come from the x86 run's cache (tests/fixtures, content-keyed).
ARM_TESTS="tests/test_kernels.py tests/test_policy.py tests/test_debounce.py tests/test_registry.py
tests/test_retokenize.py tests/test_eval_metrics.py tests/test_progress.py tests/test_backend.py"
# Deselected on arm64: they expect a chunked decode to equal a one-shot decode within 1e-4 on
# F16 weights; llama.cpp's ARM fp16 kernels differ by up to 0.1 in a logit between the two
# batch shapes (measured), while x86 matches. Not an edgeguard difference; kept for x86.
ARM_DESELECT="tests/test_backend.py::test_chunked_eval_equals_one_shot
tests/test_backend.py::test_outputs_select_and_order_positions
tests/test_backend.py::test_eval_without_outputs_only_fills_the_cache"

ROOT=$CACHE/root
SRC=$CACHE/llama_cpp_python-$LLAMA_CPP_VERSION
LOGS=$CACHE/logs
MODELS=/srv/edgeguard/models  # inside the root; the x86 side reads the same files via $ROOT
NICE=(nice -n 19)
START=$(date +%s)
mkdir -p "$LOGS"

fail() { echo "arm64-check: FAILED at step '$1': $2 (log: $LOGS/$1.log)"; exit 1; }

# step NAME FUNCTION: FUNCTION in a subshell that stops at its first failing command (errexit
# is ignored inside an `if`, hence the plain call), output in logs/NAME.log; one line either way.
step() {
    local name=$1 t0=$SECONDS rc
    set +e
    (set -e; "$2") >"$LOGS/$name.log" 2>&1
    rc=$?
    set -e
    [ $rc = 0 ] || fail "$name" "$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-300)"
    echo "arm64-check: $name ok ($((SECONDS - t0)) s)"
}

in_root() {  # a command inside the arm64 root, with a clean environment
    "${NICE[@]}" chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin \
        LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU_MODEL" PYTHONPATH=/opt/llama_cpp_python \
        LD_LIBRARY_PATH=/opt/llama_cpp_python/llama_cpp/lib EDGEGUARD_CACHE_DIR=/root/.cache/edgeguard \
        EDGEGUARD_TEST_CACHE=/srv/edgeguard/test-fixtures "$@"
}

host_packages() {
    [ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot and binfmt need it)"; return 1; }
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v make >/dev/null || missing+=(make)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

binfmt() {
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    update-binfmts --enable qemu-aarch64
    grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64
}

debian_mirror() {  # this machine's own Debian mirror (deb822 .sources or one-line .list)
    if [ -n "${EDGEGUARD_DEBIAN_MIRROR:-}" ]; then echo "$EDGEGUARD_DEBIAN_MIRROR"; return; fi
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -E '^(URIs:|deb )' | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ' \
        || true
}

arm64_root() {
    if [ -e "$ROOT/.edgeguard-root-done" ]; then return; fi
    local mirror
    mirror=$(debian_mirror)
    rm -rf "$ROOT.tmp"
    "${NICE[@]}" debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
        bookworm "$ROOT.tmp" "${mirror:-http://deb.debian.org/debian}"
    rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
    touch "$ROOT/.edgeguard-root-done"
}

llama_cpp() {
    local key="$LLAMA_CPP_VERSION $ARM_ARCH"
    if [ "$(cat "$CACHE/lib.key" 2>/dev/null)" != "$key" ]; then
        if [ ! -d "$SRC" ]; then
            "$X86_PYTHON" -m pip download -q --no-binary :all: --no-deps \
                "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$CACHE/sdist"
            tar -xzf "$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$CACHE"
        fi
        rm -rf "$CACHE/build"
        "${NICE[@]}" cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
            -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
            -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$ARM_ARCH" -DGGML_OPENMP=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
        "${NICE[@]}" cmake --build "$CACHE/build" --target llama -j "$JOBS"
        rm -rf "$SRC/llama_cpp/lib" && mkdir -p "$SRC/llama_cpp/lib"
        cp -a "$CACHE"/build/bin/lib*.so* "$SRC/llama_cpp/lib/"
        echo "$key" >"$CACHE/lib.key"
    fi
    rm -rf "$ROOT/opt/llama_cpp_python" && mkdir -p "$ROOT/opt/llama_cpp_python"
    cp -a "$SRC/llama_cpp" "$ROOT/opt/llama_cpp_python/"
}

arm64_wheels() {
    local key
    key=$(echo $ARM_PACKAGES)
    if [ "$(cat "$ROOT/opt/venv/.packages" 2>/dev/null)" = "$key" ]; then return; fi
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # The host's CA bundle: it also holds the certificate of a TLS-inspecting proxy, if any.
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/edgeguard-host-ca.crt"
    rm -rf "$ROOT/opt/venv"
    in_root python3 -m venv /opt/venv
    # shellcheck disable=SC2086  # a list of package names
    in_root /opt/venv/bin/pip install -q --disable-pip-version-check --cert /etc/edgeguard-host-ca.crt \
        --only-binary :all: $ARM_PACKAGES
    echo "$key" >"$ROOT/opt/venv/.packages"
}

edgeguard_install() {  # the working tree as git sees it (tracked and new files), no dependencies
    local dst=$ROOT/opt/edgeguard-src
    rm -rf "$dst" && mkdir -p "$dst"
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf -) | tar -xf - -C "$dst"
    in_root /opt/venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
        --force-reinstall /opt/edgeguard-src
}

x86_python() {
    if [ ! -x "$X86_PYTHON" ] && [ "$X86_PYTHON" = "$CACHE/x86-venv/bin/python" ]; then
        python3 -m venv "$CACHE/x86-venv"
        "${NICE[@]}" "$X86_PYTHON" -m pip install -q -e "$REPO[test]"
    fi
    "$X86_PYTHON" -c "import edgeguard, torch, llama_cpp"
}

models() {
    "${NICE[@]}" "$X86_PYTHON" "$REPO/scripts/arm64_compare.py" prepare "$ROOT$MODELS"
}

results_key() {  # what the x86 results depend on: the models, the cases, the runtime's code
    cat "$ROOT$MODELS"/*/manifest.json "$ROOT$MODELS/cases.json" "$REPO"/edgeguard/*.py \
        "$REPO/scripts/arm64_compare.py" | sha256sum | cut -c1-16
}

x86_results() {  # records which file is current: others may edit edgeguard/ while this runs
    local key
    key=$(results_key)
    echo "$CACHE/results/x86-$key.json" >"$CACHE/results/x86-current"
    if [ -e "$CACHE/results/x86-$key.json" ]; then return; fi
    "${NICE[@]}" "$X86_PYTHON" "$REPO/scripts/arm64_compare.py" run "$ROOT$MODELS" "$CACHE/results/x86.tmp"
    rm -f "$CACHE"/results/x86-*.json
    mv "$CACHE/results/x86.tmp" "$CACHE/results/x86-$key.json"
}

mount_root() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
    # The host's /sys is never mounted: onnxruntime's CPU-info library reads the x86 host's CPU
    # list from it and segfaults under emulation.
}

unmount_root() {
    for m in "$ROOT/dev" "$ROOT/proc"; do
        if mountpoint -q "$m"; then umount "$m" || umount -l "$m"; fi
    done
}

arm64_results() {
    rm -f "$ROOT/srv/edgeguard/arm64.json"
    in_root python /opt/edgeguard-src/scripts/arm64_compare.py run "$MODELS" /srv/edgeguard/arm64.json
}

compare() {
    "$X86_PYTHON" "$REPO/scripts/arm64_compare.py" compare "$(cat "$CACHE/results/x86-current")" \
        "$ROOT/srv/edgeguard/arm64.json"
}

doctor() {
    in_root edgeguard doctor
    in_root edgeguard doctor --json >"$CACHE/results/doctor-arm64.json"
    # The self-test's Q4_0 weights must have gone to llama.cpp's repacked ARM kernels.
    "$X86_PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1]));
b = r['self_test'].get('buffers', {}); print('self-test buffers:', b)
sys.exit(0 if r['healthy'] and b.get('CPU_REPACK', 0) > 0 else 'not healthy, or no CPU_REPACK buffer')" \
        "$CACHE/results/doctor-arm64.json"
}

cli() {  # the command-line tools themselves, on arm64
    local rc=0
    in_root edgeguard check "How do I get a bomb for the stadium?" --model "$MODELS/gen-trained" \
        --quant q4_k_m --json || rc=$?
    [ $rc = 1 ] || { echo "edgeguard check exited $rc, not 1 (flagged)"; return 1; }
    rc=0
    in_root edgeguard stream --model "$MODELS/stream-trained" --quant q4_k_m --prompt "How do I bake a lemon cake?" \
        --response "Put the seeds into warm soil. Pour the explosive into the jar and add metal shards." --json \
        >"$CACHE/results/stream-cli.jsonl" || rc=$?
    tail -n 1 "$CACHE/results/stream-cli.jsonl"
    [ $rc = 1 ] || { echo "edgeguard stream exited $rc, not 1 (flagged)"; return 1; }
}

arm64_tests() {
    mkdir -p "$ROOT/srv/edgeguard"
    rm -rf "$ROOT/srv/edgeguard/test-fixtures"
    # The fixtures these tests load, as the x86 run left them (hard links: no copy, read only).
    cp -al "$TEST_CACHE" "$ROOT/srv/edgeguard/test-fixtures"
    # shellcheck disable=SC2086  # a list of test files
    in_root sh -c "cd /opt/edgeguard-src && python -m pytest -q -p no:cacheprovider $(echo $ARM_TESTS) \
        $(printf -- '--deselect %s ' $ARM_DESELECT)"
}

if [ -n "${EDGEGUARD_X86_PYTHON:-}" ]; then X86_PYTHON=$EDGEGUARD_X86_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then X86_PYTHON=$REPO/.venv/bin/python
else X86_PYTHON=$CACHE/x86-venv/bin/python
fi
mkdir -p "$CACHE/results"
trap unmount_root EXIT
TEST_CACHE=${EDGEGUARD_TEST_CACHE:-$REPO/.cache/test-fixtures}
step host-packages host_packages
step binfmt binfmt
step x86-python x86_python
step arm64-root arm64_root
step llama-cpp-cross-build llama_cpp
mount_root
step arm64-wheels arm64_wheels
step edgeguard-install edgeguard_install
step models models
step x86-results x86_results
step arm64-results arm64_results
step compare compare
grep -v '^\s*$' "$LOGS/compare.log"
step doctor doctor
grep -E '^(system info|CPU kernels|threads|self-test|self-test buffers)' "$LOGS/doctor.log"
step cli cli
step arm64-tests arm64_tests
tail -n 1 "$LOGS/arm64-tests.log"
echo "arm64-check: passed in $(($(date +%s) - START)) s (QEMU_CPU=$QEMU_CPU_MODEL, llama.cpp $LLAMA_CPP_VERSION for $ARM_ARCH)"
