#!/bin/sh
# First step of every command on the GPU device machine (it starts bare each time): install the carried wheels
# (benchmarks/device_wheels.sh) and this checkout, without an index. Source it so PYTHONPATH reaches the caller:
#
#   run(command=". benchmarks/device_setup.sh && python3 -m pytest -q tests/test_kernels_attention.py",
#       carry=[".whl"])
#
# The Makefile is for CPU machines and CI (it builds .venv from PyPI); here python3 is the image's, which holds
# the CUDA build of torch. The copy has no .git: prefix benchmark commands with BACKDROP_COMMIT=<the commit you
# ran from> so their results name it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . \
  && python3 -c "import torch, backdrop; print('backdrop', backdrop.__version__, 'torch', torch.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
