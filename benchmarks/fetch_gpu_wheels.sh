#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels an offline GPU machine's image lacks, for
# its Python 3.12 on manylinux x86_64, checks that every requirement of every wheel is either
# in .whl/ or in the image, and prints the size of the repository with .whl/ and data_carry/.
#
#   benchmarks/fetch_gpu_wheels.sh          # on a machine with network; then copy the
#                                           # repository with .whl/ to the GPU machine
#
# The image assumed (its package list as of 2026-11-17) has jax 0.11.2 with
# the CUDA 13 plugin, flax, optax, orbax-checkpoint, scipy, matplotlib, absl-py, etils,
# cloudpickle, protobuf, psutil, pyyaml, packaging, typing-extensions and torch, but not:
#   grain (-> array-record, portpicker), nibabel, ml-collections.
# Versions: those the package is tested with here. benchmarks/gpu_suite.sh installs them
# there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
PKGS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 nibabel==5.4.2 ml-collections==1.1.0)
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"
"$PY" - <<'PYEOF'
import glob, re, sys, zipfile

# The image's packages (2026-11-17): edit for another image.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = sorted(glob.glob(".whl/*.whl"))
carried = {norm(w.split("/")[-1].split("-")[0]) for w in wheels}
have = carried | {norm(n) for n in IMAGE}
missing = []
for w in wheels:
    meta = next(n for n in zipfile.ZipFile(w).namelist() if n.endswith(".dist-info/METADATA"))
    for line in zipfile.ZipFile(w).read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.split(":", 1)[1].partition(";")
        if "extra ==" in marker or "win32" in marker or "python_version < '3.12'" in marker \
                or "python_version < \"3.12\"" in marker or "Windows" in marker:
            continue
        name = norm(re.split(r"[\s<>=!~\[(]", req.strip(), maxsplit=1)[0])
        if name not in have:
            missing.append(f"{w.split('/')[-1]} needs {req.strip()}")
print(f"{len(wheels)} wheels in .whl/: " + ", ".join(w.split("/")[-1] for w in wheels))
if missing:
    print("MISSING on the image and not carried:\n  " + "\n  ".join(missing))
    sys.exit(1)
print("every requirement is carried or in the image")
PYEOF
du -ch .whl/*.whl | tail -1 | sed 's/total/.whl\/ total/'
bash benchmarks/carry_size.sh
