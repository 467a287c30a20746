#!/usr/bin/env bash
# Download, HERE (a machine that reaches PyPI), the wheels that the GPU machine's image lacks, into .whl/.
#
#     bash bench/gpu_wheels.sh          # then, on the GPU machine, with .whl/ copied along: bash bench/gpu.sh
#
# The device machine (nvidia-h100-x1 / nvidia-h200, image 'cuda') runs CPython 3.12 on x86-64 Linux, has
# torch, numpy, accelerate, timm, typer, fsspec, scipy, pillow, safetensors, huggingface-hub, tensorboard,
# tqdm, pyyaml, click, cloudpickle, toolz, ... but NOT zarr, numcodecs, dask, diffusers or clean-fid, and it
# cannot reach any registry. This script:
#   1. appends `/.whl/` to .git/info/exclude (idempotent; .gitignore is left alone),
#   2. downloads the pinned cp312 manylinux x86_64 (or pure-python) wheels of WHEELS below, --no-deps,
#      into a fresh folder, then replaces .whl/ with it (one version of each package, nothing stale),
#   3. checks the set is complete: walks Requires-Dist from reglue's pyproject dependencies (+ dask[array]),
#      markers evaluated for CPython 3.12 / Linux / x86_64; every requirement must be a carried wheel (and
#      match its specifier) or a package of the device image (DEVICE_PACKAGES; the image versions known
#      from the device docs are checked too); fails if one is missing or a carried wheel is not needed,
#   4. prints the wheels, the total size (aim: < 40 MiB) and the size of what a device call would send.
# Pins = the versions installed on the development machine (pyproject: zarr>=3, dask, diffusers, clean-fid).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# name==version; keep one version per package. Comment = who needs it.
WHEELS=(
    zarr==3.1.6                 # pipeline/store.py (reglue dependency)
    numcodecs==0.16.6           # zarr; bench/extract.py (Blosc, Zstd) - compiled, cp312 manylinux
    donfig==0.8.1.post1         # zarr
    google-crc32c==1.9.0        # zarr - compiled, cp312 manylinux
    dask==2026.8.0              # imported by gpu.sh's environment check
    partd==1.4.2                # dask
    locket==1.0.0               # partd
    diffusers==0.42.1           # weights.py, bench/extract.py --full (SD-VAE AutoencoderKL)
    importlib-metadata==10.2.0  # diffusers (Requires-Dist, unconditional)
    lazy-importer==0.1.0        # importlib-metadata (python_version < "3.15")
    clean-fid==0.1.35           # trainer/inception.py (reglue dependency)
)
MAX_MIB=${MAX_MIB:-40}

# 1. git-ignore .whl/ through .git/info/exclude (a worktree's exclude lives in the common git dir)
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    echo "git: /.whl/ is in $exclude"
else
    echo "warning: not a git checkout; make sure .whl/ is not committed" >&2
fi

# pins vs what is installed here (informational: the pins are what gets carried)
"$PY" - "${WHEELS[@]}" <<'EOF'
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        here = md.version(name)
    except md.PackageNotFoundError:
        here = "not installed"
    if here != version:
        print(f"note: {name} pinned {version}, installed here: {here}")
        differ = True
if not globals().get("differ"):
    print("pins: the versions installed here")
EOF

# 2. download into a fresh folder, then swap it in
platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done  # the image's glibc is >= 2.39
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
    -d "$tmp/whl" "${WHEELS[@]}" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
grep -v "is ignored: it is neither a file nor a directory" "$tmp/err" >&2 || true  # this machine's local mirrors
rm -rf .whl
mkdir .whl
mv "$tmp"/whl/*.whl .whl/

# 3. completeness: Requires-Dist closure against the carried wheels + the device image
"$PY" - "$MAX_MIB" <<'EOF'
import email.parser, re, sys, tomllib, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# KINDS.md, "Python packages already there" (image 'cuda', read 2026-11-17), and the versions its
# 'pip list' row gives. A name here is not carried; an unknown version is checked by gpu.sh there.
DEVICE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
wheel wrapt xarray xxhash yarl zipp""".split()
DEVICE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                   "torch": "2.11.0", "torchvision": "0.26.0", "triton": "3.6.0", "transformers": "5.17.0",
                   "tokenizers": "0.23.2", "jax": "0.11.2"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}

device = {canonicalize_name(n) for n in DEVICE_PACKAGES}
wheels = {}  # name -> (version, [Requirement], path)
for path in sorted(Path(".whl").glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(path.name)
    assert name not in wheels, f"two wheels of {name}"
    assert any(t.interpreter in ("py3", "cp312") and t.platform in ("any", "linux_x86_64") or
               t.interpreter == "cp312" and t.platform.startswith("manylinux") and t.platform.endswith("x86_64")
               for t in tags), f"{path.name}: not a CPython 3.12 x86-64 Linux wheel"
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    wheels[name] = (version, [Requirement(r) for r in msg.get_all("Requires-Dist") or []], path)
    if name in device:
        print(f"note: {name} is also in the device image; the carried {version} shadows it")

roots = [Requirement(r) for r in tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]]
roots.append(Requirement("dask[array]"))  # gpu.sh imports dask.array in its environment check
missing, mismatch, seen, needed_by = [], [], set(), {}
todo = [(r, "reglue") for r in roots]
while todo:
    req, parent = todo.pop()
    name = canonicalize_name(req.name)
    needed_by.setdefault(name, set()).add(parent)
    if name in wheels:
        version = wheels[name][0]
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            mismatch.append(f"{parent} needs {req}, carried {name} {version}")
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for sub in wheels[name][1]:
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({**ENV, "extra": e}) for e in extras):
                todo.append((sub, f"{name} {version}"))
    elif name in device:
        known = DEVICE_VERSIONS.get(name)
        if known and req.specifier and not req.specifier.contains(Version(known), prereleases=True):
            mismatch.append(f"{parent} needs {req}, device image has {name} {known}")
    else:
        missing.append(f"{req} (needed by {parent})")

unneeded = sorted(set(wheels) - set(needed_by))
total = sum(w[2].stat().st_size for w in wheels.values())
print(f"\n{'wheel':<64} {'MiB':>6}  needed by")
for name, (version, _, path) in sorted(wheels.items()):
    print(f"{path.name:<64} {path.stat().st_size / 2**20:6.2f}  {', '.join(sorted(needed_by.get(name, {'-'})))}")
print(f"{len(wheels)} wheels, total {total / 2**20:.2f} MiB ({total:,} bytes) in .whl/")
from_device = sorted(n for n in needed_by if n not in wheels)
print(f"taken from the device image ({len(from_device)}): {' '.join(from_device)}")
for line in mismatch:
    print("VERSION MISMATCH:", line)
for line in missing:
    print("MISSING (neither carried nor in the device image):", line)
for name in unneeded:
    print("NOT NEEDED (no requirement reaches it):", name)
if total > float(sys.argv[1]) * 2**20:
    print(f"TOO LARGE: over {sys.argv[1]} MiB")
if missing or mismatch or unneeded or total > float(sys.argv[1]) * 2**20:
    sys.exit(1)
print("closure complete: every requirement is a carried wheel or in the device image")
EOF

# 4. what a device call sends: tracked + untracked-not-ignored files, plus the carried .whl (limit 64 MiB)
tree=$(git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 -r stat -c %s -- 2>/dev/null |
       awk '{s+=$1} END {print s+0}')
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "device call size: working tree $((tree / 1024)) KiB + .whl $((whl / 1024)) KiB = $(((tree + whl) / 1048576)) MiB (limit 64 MiB)"
