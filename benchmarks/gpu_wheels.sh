#!/usr/bin/env bash
# Fills .whl/ (git-ignored through .git/info/exclude) with the packages `benchmarks/gpu_check.py` needs that a bare
# CUDA machine with torch, transformers, accelerate and peft lacks, for Python 3.12 on x86-64: datasets (and an older
# one in .whl/alt for pyarrow < 24), liger-kernel, bitsandbytes (only its CUDA 13 and CPU libraries: 7 MB instead of
# 43), and DeepSpeed (built here into a pure-Python wheel: its ops are compiled on first use, none are needed by
# ZeRO-2/3 with the Trainer's optimizer) with its own needs. Run it on a machine that reaches PyPI; it needs the
# project's .venv (DeepSpeed's setup imports torch).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/alt
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { python3 -m pip download -q --no-deps "${platform[@]}" -d "$@"; }
get .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 bitsandbytes==0.50.2 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions
get .whl/alt datasets==4.6.0
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
python3 - <<'PY'
import glob, os, zipfile  # bitsandbytes: keep the CPU and CUDA 13 libraries only
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
keep = lambda n: not n.endswith(".so") or any(k in n for k in ("_cpu.so", "_cuda130.so", "_cuda132.so"))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if keep(info.filename):
            data = zin.read(info.filename)
            if info.filename.endswith("RECORD"):
                data = "\n".join(l for l in data.decode().splitlines() if keep(l.split(",")[0])).encode() + b"\n"
            zout.writestr(info, data)
os.replace(src + ".tmp", src)
PY
du -sh .whl
