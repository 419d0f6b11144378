#!/bin/sh
# Steps of a GPU device session, run one after the other in one `run` call. Here, once:
# `sh benchmarks/device_wheels.sh`; then
#
#   run(command="sh benchmarks/on_device.sh $(git rev-parse --short HEAD) STEP [STEP ...]", carry=[".whl"],
#       timeout_s=600)
#
# with steps adding up to well under 10 minutes (the machine is given back 30 s after a call, and a new one takes
# minutes to start: chain calls at once, or put more steps in one). A session has 30 device minutes, about five
# steps: first one goal of each open issue, in this order: tests16 kernels-fp16 | txt2img | train256 | serve;
# the rest in the next session.
#
#   tests16       attention + GroupNorm tests in fp16 and bf16 on CUDA (bf16 runs only there)      ~5-8 min
#   tests32       the rest of those two files (fp32, sm_90a fits, dispatch), the UNet-level kernel
#                 test, the CUDA-graph replay test (tests/test_serve_engine.py), the no-host-sync
#                 training and sampling tests                                                     ~4-6 min
#   suite         every other test file, on a machine where CUDA is there (-n 8)                  ~3 min
#   kernels-fp16  benchmarks/kernels.py, attention + GroupNorm, forward and forward+backward      ~5-7 min
#   kernels-bf16  the same in bf16 (the CSV is written row by row: a run cut short keeps its rows)
#   graphs        benchmarks/kernels.py attention forward as CUDA-graph replays (launch-free), fp16;
#                 its forward+backward rows are timed too, eagerly                               ~4-5 min
#   txt2img       benchmarks/pipeline.py SD1.5 512², 30 steps, batch 1: fp16 vs diffusers, graphs ~5 min
#   inpaint       the same for inpainting                                                         ~5 min
#   controlnet    the same, text-to-image with one ControlNet (our ControlNet calls run eagerly)   ~6 min
#   cl            txt2img, ours fp16 vs channels-last weights (an experiment: worth a default on CUDA?) ~2 min
#   train256      benchmarks/train.py SD1.5 at 256², inpaint stage, bf16, batch 32                ~4 min
#   train512      the same at 512², batch 16                                                      ~5 min
#   pretrain256   the pretrain stage at 256² (no masked-image VAE encode: ~28% fewer FLOPs)       ~3 min
#   pretrain512   the same at 512²                                                                ~4 min
#   serve         benchmarks/serve_load.py SD1.5 inpaint 512², 30 steps, concurrency 1, 8, 16     ~6 min
#
# The steps' output goes to $OUT/steps.log, the benchmarks' CSVs to $OUT (8 files come back at most). Copy the
# CSVs into benchmarks/results/ here after each call: the next call carries them, and the benchmarks merge new rows
# into the file they find. Commit them; each CSV row names the GPU (machine / gpu column) and the commit passed here.
set -u
[ $# -ge 2 ] || { echo "usage: on_device.sh COMMIT STEP [STEP ...]" >&2; exit 2; }
COMMIT=$1
shift
OUT=${OUT:?on_device.sh runs on the device machine, where OUT is set}
export BACKDROP_COMMIT="$COMMIT" PYTHONUNBUFFERED=1

KERNEL_TESTS="tests/test_kernels_attention.py tests/test_kernels_group_norm.py"
command_of() {  # the command line of step $1
  case "$1" in
    tests16) echo "python3 -m pytest -q -n 8 $KERNEL_TESTS -k 'fp16 or bf16'" ;;
    tests32) echo "python3 -m pytest -q -n 8 $KERNEL_TESTS -k 'not fp16 and not bf16'; s=\$?; python3 -m pytest" \
                  "-q tests/test_unet.py tests/test_serve_engine.py tests/test_stages.py tests/test_pipeline.py" \
                  "-k 'triton or cuda or graph' && exit \$s" ;;
    suite) echo "python3 -m pytest -q -n 8 tests --deselect tests/test_kernels_attention.py" \
                "--deselect tests/test_kernels_group_norm.py" ;;
    kernels-fp16 | kernels-bf16) echo "python3 benchmarks/kernels.py --dtypes ${1#kernels-} --out $OUT/$1.csv" ;;
    graphs) echo "python3 benchmarks/kernels.py --ops attention --cudagraph --dtypes fp16" \
                 "--out $OUT/kernels-cudagraph.csv" ;;
    cl) echo "python3 benchmarks/pipeline.py --models sd15 --tasks txt2img --batches 1 --steps 30 --repeats 3" \
             "--impls ours:fp16,ours:cl" ;;
    txt2img | inpaint | controlnet) echo "python3 benchmarks/pipeline.py --models sd15 --tasks $1 --batches 1" \
                                         "--steps 30 --repeats 3" ;;
    train256 | train512) echo "python3 benchmarks/train.py --cases sd15-${1#train} --stages inpaint --repeats 1" ;;
    pretrain256 | pretrain512) echo "python3 benchmarks/train.py --cases sd15-${1#pretrain} --stages pretrain" \
                                    "--repeats 1" ;;
    serve) echo "python3 benchmarks/serve_load.py --device cuda --model sd15-inpaint --size 512 --steps 30" \
                "--concurrency 1,8,16 --repeats 1 --min-requests 32 --max-seconds 60" ;;
    *) return 1 ;;
  esac
}
for step in "$@"; do  # check every name before spending device time on the first
  command_of "$step" >/dev/null || { echo "on_device.sh: unknown step '$step' (see the list at the top)" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
. benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
failed=""
for step in "$@"; do
  cmd=$(command_of "$step")
  echo "+ [$step] $cmd" | tee -a "$OUT/steps.log"
  { sh -c "$cmd" 2>&1; echo $? >/tmp/on_device.status; } | tee -a "$OUT/steps.log"  # POSIX sh has no pipefail
  [ "$(cat /tmp/on_device.status)" = 0 ] || failed="$failed $step"
  cp benchmarks/results/*-cuda.csv "$OUT/" 2>/dev/null
done
[ -z "$failed" ] || { echo "failed:$failed"; exit 1; }
