#!/usr/bin/env bash
# The GPU checks and figures of docs/performance.md and docs/training.md in one run (about 7 minutes on
# an H100): the fast-path tests on CUDA, GroupNorm alone (PyTorch's and ours), fp16/bf16 inference
# (plain, fast, each optimisation, cudnn.benchmark, switches, profiles of a switch and of one image),
# the unpaired training step at 512x512 under a 22 GiB allocator cap (a 24 GB card), the fp32 baseline
# with fp16 beside it, and the compiled path. Needs diffusers, peft and transformers where it runs (on
# a machine without diffusers, install its wheel first, e.g. pip install --target and PYTHONPATH).
#
#     bash benchmarks/gpu.sh [OUTPUT_DIR]      (default: gpu-results; PYTHON=... picks the interpreter,
#                                               PARTS="tests bench_fp16" runs only those parts)
#
# Each part has its own time limit and log (OUTPUT_DIR/NAME.md: the tables, NAME.err: progress, errors).
set -u
out=${1:-gpu-results}
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, diffusers, peft, transformers as t; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', t.__version__)" | tee -a "$out/gpu.txt"

parts=${PARTS:-tests group_norm bench_fp16 train_memory bench_fp32 bench_compile}

part() {  # NAME SECONDS ARGS...: run one part, print its tables
    local name=$1 limit=$2
    shift 2
    case " $parts " in *" $name "*) ;; *) return ;; esac
    echo "== $name"
    timeout "$limit" "$py" "$@" >"$out/$name.md" 2>"$out/$name.err"
    local rc=$?
    cat "$out/$name.md"
    if [ "$rc" != 0 ]; then
        echo "!! $name: exit $rc"
        tail -c 1500 "$out/$name.err"
    fi
}

part tests 150 -m pytest -q --tb=short -p no:cacheprovider tests/test_fast.py tests/test_exact_fold.py \
    tests/test_cuda_graph.py tests/test_group_norm.py
part group_norm 60 benchmarks/group_norm.py --dtype fp16
part bench_fp16 180 -m turbo.fast.bench --device cuda --dtype fp16 --dtypes bf16 --sizes 512 256 --repeats 20 \
    --warmup 3 --switch-repeats 5 --cudnn-benchmark --json "$out/bench_fp16.json" \
    --profile-switch "$out/switch_profile.txt" --profile-forward "$out/forward_profile.txt"
part train_memory 120 benchmarks/train_step.py --unpaired-memory --real --real-only --sizes full \
    --resolution 512 --cap-gib 22
part bench_fp32 90 -m turbo.fast.bench --device cuda --sizes 512 --repeats 10 --warmup 2 --only fast plain \
    --dtypes fp16 --json "$out/bench_fp32.json"
part bench_compile 180 -m turbo.fast.bench --device cuda --dtype fp16 --sizes 512 --repeats 20 --warmup 2 \
    --compile --only fast --switch-repeats 1 --json "$out/bench_compile.json"
