#!/bin/sh
# The Python packages that the GPU device machine lacks for the tests and benchmarks, as wheels in .whl/ (git-ignored),
# fetched here where PyPI is reachable; the device machine reaches nothing, so each `run` carries .whl and installs
# it first (benchmarks/device_setup.sh). Versions are the ones this repo's CPU CI runs. Not carried: ray (its wheel
# alone is over the 64 MiB a call can carry; tests/test_ray_serve.py skips without it) and tensorrt (PyPI's
# tensorrt-cu13-libs is only an sdist that downloads the libraries from pypi.nvidia.com, unreachable from here).
#
#   sh benchmarks/device_wheels.sh        # here, once; then run(..., carry=[".whl"])
set -eu
cd "$(dirname "$0")/.."
# The device image (Python 3.12, x86-64) already has torch, triton, transformers, tokenizers, safetensors,
# huggingface-hub, numpy, pillow, tqdm, regex, requests, filelock, httpx, anyio, h11, click, onnx, onnxruntime,
# sympy, packaging and colorama: see /work/.library/device/KINDS.md. setuptools is carried for pyproject's PEP 639
# licence fields (77 or later), which the image's may predate (device_setup.sh installs the checkout without
# build isolation).
PACKAGES="
diffusers==0.42.1 accelerate==1.15.0 typing_extensions==4.16.0
starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
openai==3.54.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
onnxslim==0.1.98 ml_dtypes==0.6.0
setuptools==80.9.0
"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PACKAGES
du -sh .whl
