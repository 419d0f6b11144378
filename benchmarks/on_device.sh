#!/bin/sh
# One step of a GPU device session, each sized to end well inside one 10-minute `run` call. Here, once:
# `sh benchmarks/device_wheels.sh`; then, for each step, in this order (the device time is 30 minutes in all):
#
#   run(command="sh benchmarks/on_device.sh $(git rev-parse --short HEAD) STEP", carry=[".whl"], timeout_s=600)
#
#   tests16    attention + GroupNorm tests in fp16 and bf16 on CUDA (bf16 runs only there)     ~5-8 min
#   tests32    the rest of those two files (fp32, sm_90a fits, dispatch), the UNet-level kernel
#              test and the CUDA-graph server tests                                             ~4-6 min
#   suite      every other test file, on a machine where CUDA is there (-n 8)                   ~3 min
#   kernels    benchmarks/kernels.py, fp16 and bf16, forward and forward+backward               ~8-10 min
#   graphs     benchmarks/kernels.py attention forward as CUDA-graph replays (launch-free)      ~3 min
#   txt2img    benchmarks/pipeline.py SD1.5 512², 30 steps, batch 1: fp16 vs diffusers, graphs  ~5 min
#   inpaint    the same for inpainting                                                          ~5 min
#   train256   benchmarks/train.py SD1.5 at 256², inpaint stage, bf16                           ~4 min
#   train512   the same at 512²                                                                 ~5 min
#   serve      benchmarks/serve_load.py SD1.5 inpaint 512², 30 steps, concurrency 1, 8, 16      ~6 min
#
# Every step writes its log and CSVs to $OUT. Copy them into benchmarks/results/ here after each call: the next
# call carries them, and the benchmarks merge their new rows into the file they find. Commit them with the GPU's
# name (in each CSV's machine column) and the commit passed here.
set -u
COMMIT=${1:?usage: on_device.sh COMMIT STEP}
STEP=${2:?usage: on_device.sh COMMIT STEP}
OUT=${OUT:?on_device.sh runs on the device machine, where OUT is set}
export BACKDROP_COMMIT="$COMMIT" PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
. benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader

KERNEL_TESTS="tests/test_kernels_attention.py tests/test_kernels_group_norm.py"
case "$STEP" in
  tests16) set -- python3 -m pytest -q -n 4 $KERNEL_TESTS -k "fp16 or bf16" ;;
  tests32) set -- sh -c "python3 -m pytest -q -n 4 $KERNEL_TESTS -k 'not fp16 and not bf16'; a=\$?; \
             python3 -m pytest -q tests/test_unet.py tests/test_server.py -k 'triton or cuda or graph'; \
             exit \$((a | \$?))" ;;
  suite) set -- python3 -m pytest -q -n 8 tests --deselect tests/test_kernels_attention.py \
             --deselect tests/test_kernels_group_norm.py ;;
  kernels) set -- python3 benchmarks/kernels.py --out "$OUT/kernels-h100.csv" ;;
  graphs) set -- python3 benchmarks/kernels.py --ops attention --cudagraph --out "$OUT/kernels-h100-cudagraph.csv" ;;
  txt2img | inpaint) set -- python3 benchmarks/pipeline.py --models sd15 --tasks "$STEP" --batches 1 --steps 30 \
             --repeats 3 ;;
  train256 | train512) set -- python3 benchmarks/train.py --cases "sd15-${STEP#train}" --stages inpaint \
             --repeats 1 ;;
  serve) set -- python3 benchmarks/serve_load.py --device cuda --model sd15-inpaint --size 512 --steps 30 \
             --concurrency 1,8,16 --repeats 1 --min-requests 32 --max-seconds 60 ;;
  *) echo "on_device.sh: unknown step '$STEP' (see the list at the top of this file)" >&2; exit 2 ;;
esac
echo "+ $*"
{ "$@" 2>&1; echo $? >/tmp/on_device.status; } | tee "$OUT/$STEP.log"  # POSIX sh has no pipefail
cp benchmarks/results/*-cuda.csv "$OUT/" 2>/dev/null
exit "$(cat /tmp/on_device.status)"
