#!/usr/bin/env bash
# Runs the test suite on aarch64 from an x86-64 Debian 12 machine, under qemu user emulation:
# an arm64 Debian root made by debootstrap, aarch64 wheels unpacked by the host's pip, the two
# compiled kernels built by the host's aarch64 cross compiler (gcc under emulation takes
# minutes per file), then pytest in the arm64 root, with the kernels and without them.
#
#   sudo scripts/aarch64_suite.sh [WORKDIR [PYTEST_ARGS...]]
#                                   (needs root: debootstrap, chroot, binfmt_misc)
#
# PYTEST_ARGS (default: the whole suite, less the parts below) select tests.
# WORKDIR (default /work/arm64) receives the root and the logs (out_kernels.log,
# out_nokernels.log in WORKDIR/root). torch is 2.9.1: PyPI's aarch64 wheel of the pinned 2.13.0
# is a CUDA build whose CUDA dependencies do not install there. Emulation is slow (about 30
# minutes per mode on 2 cores), so the tests marked `inductor` (C++ compiled under emulation;
# the root has no compiler, and they would skip), the model-by-model compile sweep of
# tests/peft/test_compile.py, the Hugging Face tests and the demo are left out.
set -euo pipefail
W=${1:-/work/arm64}
shift || true
R=$W/root
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PLAT=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
      --platform manylinux_2_17_aarch64 --python-version 3.11.2 --implementation cp
      --only-binary=:all: --no-deps)

apt-get install -y -q qemu-user-static gcc-aarch64-linux-gnu debootstrap binfmt-support
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64
[ -x "$R/usr/bin/python3" ] || debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-dev,ca-certificates bookworm "$R" http://deb.debian.org/debian

# the wheels: torch without its (x86-only) CUDA markers, then what the suite imports
mkdir -p "$R/site"
$PY -m pip install -q --target "$R/site" "${PLAT[@]}" torch==2.9.1 filelock typing-extensions \
    sympy networkx jinja2 MarkupSafe fsspec numpy scipy geoopt safetensors mpmath pytest \
    pytest-xdist execnet hypothesis sortedcontainers attrs iniconfig pluggy packaging pygments \
    setuptools

# a clean copy of the repository with the kernels cross-built into it, as setup.py builds them
rm -rf "$R/repo" && git clone -q "$REPO" "$R/repo"
INC=(-I"$R/usr/include/python3.11" -I"$R/usr/include" -I"$R/usr/include/aarch64-linux-gnu")
F=(-O3 -g0 -std=c11 -fno-strict-aliasing -Wno-psabi -fPIC -DNDEBUG)
CC=aarch64-linux-gnu-gcc
(cd "$R/repo"
 $CC "${F[@]}" "${INC[@]}" -Iliegroup/linalg -c liegroup/linalg/_cexpm.c -o /tmp/a_cexpm.o
 $CC -shared /tmp/a_cexpm.o -o liegroup/linalg/_cexpm.cpython-311-aarch64-linux-gnu.so
 $CC "${F[@]}" -ffp-contract=fast -Werror=implicit-function-declaration "${INC[@]}" \
     -c liegroup/peft/_engine/_cfused.c -o /tmp/a__cfused.o
 $CC -shared /tmp/a__cfused.o -o liegroup/peft/_engine/_cfused.cpython-311-aarch64-linux-gnu.so)

cat > "$R/run_suite.sh" <<'EOF'
#!/bin/bash
cd /repo
export PYTHONPATH=/site:/repo HF_HUB_OFFLINE=1
SKIP=(-m "not slow and not inductor" --ignore=tests/peft/test_compile.py
      --ignore=tests/hf --ignore=tests/test_demo.py)
python3 -m pytest -n 2 -q -p no:cacheprovider "${SKIP[@]}" "$@" > /out_kernels.log 2>&1
echo "rc=$?" >> /out_kernels.log
LIEGROUP_DISABLE_KERNELS=1 python3 -m pytest -n 2 -q -p no:cacheprovider "${SKIP[@]}" "$@" \
    > /out_nokernels.log 2>&1
echo "rc=$?" >> /out_nokernels.log
EOF
chmod +x "$R/run_suite.sh"
for m in proc sys dev; do mountpoint -q "$R/$m" || mount --bind "/$m" "$R/$m"; done
chroot "$R" /run_suite.sh "$@"
tail -n 3 "$R/out_kernels.log" "$R/out_nokernels.log"
