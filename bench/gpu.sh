#!/usr/bin/env bash
# Every GPU benchmark in bench/ in one go, about 4-6 minutes on an H100.
#
#   GPU machine:  bash bench/gpu.sh    (offline: first `bash bench/gpu_wheels.sh` on a machine online,
#                                       which fills .whl/, and copy .whl/ along with the checkout)
#   CPU check:    bash bench/gpu.sh --dry-run        # or GPU_SH_CPU_SMOKE=1: the CPU smoke mode, see below
#
# Device mode:
#   1. fails fast (exit 3) unless nvidia-smi and torch see a CUDA device; prints `nvidia-smi -L`, python,
#      torch, CUDA, cuDNN and /dev/shm;
#   2. installs the carried wheels (.whl/, exit 4 if none) into /tmp/site, --no-index --no-deps, and makes
#      this checkout importable as `reglue` with no network: /tmp/pkg/reglue -> the checkout, plus a
#      minimal /tmp/pkg/reglue-<version>.dist-info (pipeline/extract.py records version("reglue"));
#      PYTHONPATH=/tmp/pkg:/tmp/site;
#   3. checks each carried wheel's Requires-Dist against what is importable (warnings only), then imports
#      the modules the benchmarks need (exit 5 if one fails: nothing would run);
#   4. runs the steps below, each under `timeout` (SIGINT first, so Python prints where it was), the
#      whole run under GPU_SH_BUDGET seconds (default 450) from the script's start: a step gets
#      min(its cap, time left) and is skipped with under 20 s left. A failed step does not stop the others;
#   5. writes the tables to $OUT/gpu-results.md and the whole output to $OUT/gpu-log.txt ($OUT if set;
#      without it, a fresh /tmp/reglue-gpu.* folder), then prints a summary
#      table and the results file. Exit status: 0 if every step passed, else 1.
#
#   step      cap   command (device mode)
#   sampling  150s  bench/sampling.py --device cuda --models SiT-B/2 SiT-XL/2 --steps 50 --batch 64
#   train-B   120s  bench/train_step.py --models SiT-B/2 --batch 256
#   train-XL  150s  bench/train_step.py --models SiT-XL/2 --batch 128   (256: ~0.3 GB of activations per
#                                                                       sample, estimated, would not fit; the script halves on OOM)
#   extract   180s  bench/extract.py throughput --full --device cuda --batch-size 256
#                   --num-workers min(12, cores-4) --images 4096 --repeats 3
#                   (4096 JPEGs are made first, ~25 s on one core; the SD-VAE encodes in fp32,
#                   ~250 GFLOP/image at 256 px, 7 passes over the images)
#
# CPU smoke mode (--dry-run, --smoke or GPU_SH_CPU_SMOKE=1), for the CPU machine: no CUDA check; installs
# the wheels with a CPython 3.12 (GPU_SH_PY312, else pyenv's 3.12.x, else skipped) into a temporary target,
# which proves the cp312 set installs; if that Python also has numpy (a venv standing in for the device
# image), imports the carried packages with it and round-trips a zstd Zarr array and the numcodecs codecs.
# Then the same steps, in their smoke variants, with the local python3's packages (cp312 builds cannot load
# in another Python) but the same /tmp/pkg-style `reglue` link and dist-info, the same import check, the
# same timeouts and tables.
#
# Other knobs: GPU_SH_STEPS="sampling extract" (a subset, e.g. to rerun one), GPU_SH_PYTHON (default python3).
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
START=$(date +%s)

SMOKE=${GPU_SH_CPU_SMOKE:-0}
for arg in "$@"; do
    case $arg in
        --dry-run | --smoke | --cpu-smoke) SMOKE=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
[[ $SMOKE == 1 ]] || SMOKE=0
PY=${GPU_SH_PYTHON:-python3}
BUDGET=${GPU_SH_BUDGET:-450}
DEADLINE=$((START + BUDGET))
STEPS=${GPU_SH_STEPS:-sampling train-B train-XL extract}
for s in $STEPS; do
    case $s in sampling | train-B | train-XL | extract) ;; *) echo "gpu.sh: unknown step '$s' in GPU_SH_STEPS" >&2; exit 2 ;; esac
done

RES=${OUT:-}
[[ -n $RES ]] || RES=$(mktemp -d /tmp/reglue-gpu.XXXXXX)
mkdir -p "$RES"
RESULTS=$RES/gpu-results.md
LOG=$RES/gpu-log.txt
WORK=$(mktemp -d /tmp/reglue-gpu-work.XXXXXX)  # step outputs, kept out of $OUT (at most 8 files come back)
if [[ $SMOKE == 1 ]]; then
    PKG=$WORK/pkg SITE=$WORK/site
else
    PKG=/tmp/pkg SITE=/tmp/site
fi
trap 'rm -rf "$WORK"' EXIT

# A script started in the background without job control inherits SIGINT ignored, and Python then keeps
# it ignored: `env --default-signal=INT` restores it so that timeout's SIGINT gives a traceback.
DEFSIG=()
env --default-signal=INT true 2>/dev/null && DEFSIG=(env --default-signal=INT)

check_cuda() {  # fail fast: nothing here is worth running without a GPU
    if [[ $SMOKE == 1 ]]; then
        echo "smoke mode: no CUDA check; nvidia-smi: $(command -v nvidia-smi || echo 'not here')"
        return
    fi
    if ! nvidia-smi -L; then
        echo "ERROR: no CUDA device visible: nvidia-smi -L failed. This script needs a GPU machine" \
             "(or run it with --dry-run for the CPU smoke mode)." >&2
        exit 3
    fi
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() else 1)'; then
        echo "ERROR: no CUDA device visible to torch (torch.cuda.is_available() is False)" \
             "although nvidia-smi answered; CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-}'." >&2
        exit 3
    fi
}

environment() {
    "$PY" - <<'EOF'
import os, platform, sys, torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuDNN {torch.backends.cudnn.version()}; {os.cpu_count()} CPUs")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"sm_{p.major}{p.minor}")
EOF
    df -h /dev/shm /tmp 2>/dev/null | sed 's/^/    /'
}

install_wheels() {
    shopt -s nullglob
    local wheels=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        echo "ERROR: no wheels in .whl/: run 'bash bench/gpu_wheels.sh' on a machine online first and copy" \
             ".whl/ here along with the checkout." >&2
        exit 4
    fi
    local installer=$PY
    if [[ $SMOKE == 1 ]]; then
        installer=${GPU_SH_PY312:-$(command -v python3.12 || true)}
        if [[ -z $installer ]] || ! "$installer" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "smoke mode: no CPython 3.12 here (set GPU_SH_PY312): the cp312 install is NOT checked"
            installer=
        fi
    fi
    if [[ -n $installer ]]; then
        echo "installing ${#wheels[@]} wheels into $SITE with $installer"
        mkdir -p "$SITE"
        "$installer" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || { echo "ERROR: wheel install failed" >&2; exit 4; }
        ls "$SITE" | grep -c 'dist-info$' | sed 's/^/    dist-info folders in the target: /'
    fi
    if [[ $SMOKE == 1 && -n $installer ]]; then
        if "$installer" -c 'import numpy' 2>/dev/null; then
            echo "smoke mode: importing the carried packages with $installer (PYTHONPATH=$SITE only)"
            PYTHONPATH=$SITE "$installer" - "$SITE" <<'EOF' || { echo "ERROR: the cp312 wheel set does not import" >&2; exit 5; }
import sys, tempfile
import dask, dask.array as da, diffusers, donfig, google_crc32c, importlib_metadata, locket, numcodecs, numpy as np
import partd, zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import ZstdCodec
import cleanfid  # its submodules import torch, which this stand-in lacks
for m in (zarr, numcodecs, dask, diffusers, cleanfid, donfig, google_crc32c):
    assert m.__file__.startswith(sys.argv[1]), (m.__name__, m.__file__)
x = np.arange(4096, dtype=np.float16).reshape(64, 64)
with tempfile.TemporaryDirectory() as d:
    z = zarr.create_array(f"{d}/a.zarr", shape=x.shape, chunks=(16, 64), dtype=x.dtype, compressors=ZstdCodec(level=3))
    z[:] = x
    assert (zarr.open_array(f"{d}/a.zarr")[:] == x).all()
for c in (Zstd(3), Blosc("lz4", 5, Blosc.SHUFFLE)):
    assert bytes(c.decode(c.encode(x.tobytes()))) == x.tobytes()
y = x.astype(np.float32)
assert da.from_array(y, chunks=16).sum().compute() == y.sum()
print(f"    cp312 OK: zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, dask {dask.__version__}, "
      f"diffusers {diffusers.__version__}, numpy {np.__version__}; Zarr zstd round trip, Blosc/Zstd, dask.array")
EOF
        else
            echo "smoke mode: $installer has no numpy, so the cp312 packages are installed but not imported"
        fi
    fi
}

link_reglue() {  # the checkout as the package `reglue`, plus the metadata importlib.metadata.version reads
    local version
    version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/__init__.py")
    mkdir -p "$PKG/reglue-$version.dist-info"
    ln -sfn "$REPO" "$PKG/reglue"
    printf 'Metadata-Version: 2.1\nName: reglue\nVersion: %s\n' "$version" >"$PKG/reglue-$version.dist-info/METADATA"
    if [[ $SMOKE == 1 ]]; then
        export PYTHONPATH=$PKG  # the local python3 cannot load the cp312 builds in $SITE: its own packages
    else
        export PYTHONPATH=$PKG:$SITE
    fi
    echo "PYTHONPATH=$PYTHONPATH"
}

check_requirements() {  # warnings only: the carried wheels' Requires-Dist against what this Python sees
    [[ -d $SITE ]] || return 0
    "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md, platform, sys
from packaging.requirements import Requirement
from packaging.version import Version
env = {"python_version": ".".join(platform.python_version_tuple()[:2]), "extra": ""}
problems, count = [], 0
for dist in md.distributions(path=[sys.argv[1]]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        count += 1
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
            problems.append(f"{dist.metadata['Name']} needs {req}: found {have}")
print(f"requirements of the carried wheels: {count} checked, " + ("all satisfied" if not problems else
      f"{len(problems)} NOT satisfied (warnings):\n    " + "\n    ".join(problems)))
EOF
}

check_imports() {
    "$PY" - "$PKG" <<'EOF' || { echo "ERROR: the benchmarks' imports fail (see above): nothing would run" >&2; exit 5; }
import importlib.metadata as md, os, sys
import accelerate, dask, dask.array, diffusers, numcodecs, numpy, timm, torch, zarr
from diffusers import AutoencoderKL
import reglue, reglue.pipeline.extract, reglue.pipeline.store, reglue.trainer.compressor_train, reglue.trainer.evaluate
import reglue.trainer.loop, reglue.trainer.sampling, reglue.weights
from cleanfid import inception_pytorch
link = os.path.join(sys.argv[1], "reglue")
assert os.path.dirname(reglue.__file__) == link, f"reglue imported from {reglue.__file__}, not from {link}"
print(f"imports OK: reglue {md.version('reglue')} from {link}; " +
      ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, numpy, zarr, numcodecs, dask, diffusers, timm,
                                                         accelerate)))
for m in (zarr, numcodecs, dask, diffusers):
    print(f"    {m.__name__}: {os.path.dirname(m.__file__)}")
EOF
}

declare -a SUMMARY=()
FAILED=0

# step NAME CAP HEADER -- COMMAND...   (HEADER: table header lines to put before rows the script prints bare)
step() {
    local name=$1 cap=$2 header=$3
    shift 4
    if [[ " $STEPS " != *" $name "* ]]; then
        return
    fi
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        SUMMARY+=("| $name | SKIPPED (budget: ${left}s left) | 0 | $cap | \`$*\` |")
        FAILED=1
        return
    fi
    echo
    echo "=== $name (timeout ${limit}s): $*"
    local t0 out=$WORK/$name.out rc status
    t0=$(date +%s)
    timeout -s INT -k 10 "$limit" "${DEFSIG[@]}" "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    local seconds=$(($(date +%s) - t0))
    case $rc in
        0) status=ok ;;
        124) status="TIMEOUT after ${limit}s" ;;
        137) status="KILLED after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILED=1
    {
        echo
        echo "### $name: $status, ${seconds}s"
        echo
        echo "    $*"
        echo
        grep -E '^(# |device: )' "$out" | sed 's/\r//g; $a\\'
        [[ -z $header ]] || printf '%b\n' "$header"
        grep -E '^\|' "$out"
        if ((rc != 0)); then
            echo
            echo '```'
            tail -n 25 "$out" | tr '\r' '\n' | tail -n 25
            echo '```'
        fi
    } >>"$RESULTS"
    SUMMARY+=("| $name | $status | $seconds | $limit | \`$*\` |")
}

main() {
    : >"$RESULTS"
    echo "# reglue GPU benchmarks ($([[ $SMOKE == 1 ]] && echo 'CPU SMOKE MODE: not GPU numbers' || echo device))" >>"$RESULTS"
    echo "started $(date -u +%FT%TZ); checkout $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '(no git)'); budget ${BUDGET}s; results in $RES"
    check_cuda
    { echo; echo '```'; nvidia-smi -L 2>/dev/null; environment; echo '```'; } | tee -a "$RESULTS"
    install_wheels
    link_reglue
    check_requirements
    check_imports | tee -a "$RESULTS"
    ((PIPESTATUS[0] == 0)) || exit 5

    local cores workers
    cores=$(nproc)
    workers=$((cores - 4 > 12 ? 12 : (cores - 4 < 1 ? 1 : cores - 4)))
    local ex_header='| models | res | batch | workers | bare img/s | extract img/s | ratio | notes |\n|---|---|---|---|---|---|---|---|'
    if [[ $SMOKE == 1 ]]; then
        step sampling 120 "" -- "$PY" bench/sampling.py --smoke
        step train-B 120 "" -- "$PY" bench/train_step.py --smoke --models SiT-B/2
        step train-XL 120 "" -- "$PY" bench/train_step.py --smoke --models SiT-XL/2
        step extract 120 "$ex_header" -- "$PY" bench/extract.py throughput --full --device cpu --resolution 64 \
            --images 16 --batch-size 8 --num-workers 1 --repeats 1
    else
        step sampling 150 "" -- "$PY" bench/sampling.py --device cuda --models SiT-B/2 SiT-XL/2 --steps 50 --batch 64
        step train-B 120 "" -- "$PY" bench/train_step.py --models SiT-B/2 --batch 256
        step train-XL 150 "" -- "$PY" bench/train_step.py --models SiT-XL/2 --batch 128
        step extract 180 "$ex_header" -- "$PY" bench/extract.py throughput --full --device cuda --batch-size 256 \
            --num-workers "$workers" --images 4096 --repeats 3
    fi

    {
        echo
        echo "## Summary ($(($(date +%s) - START))s in all)"
        echo
        echo "| step | status | seconds | timeout s | command |"
        echo "|---|---|---|---|---|"
        printf '%s\n' "${SUMMARY[@]}"
    } >>"$RESULTS"
    echo
    echo "================ combined results ($RESULTS) ================"
    cat "$RESULTS"
    return $FAILED
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
