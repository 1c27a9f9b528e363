#!/usr/bin/env bash
# One-shot GPU benchmark for issue 6 on one H200: GPU-only tests, then peer vs phitune, JSON lines into $OUT.
#
# Run through the device tool from the repository root, carrying the wheels in .whl (liger-kernel only; the image
# has torch, transformers, peft, triton):
#   here, once:  mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                    --platform manylinux2014_x86_64 --platform any -d .whl liger-kernel==0.8.5
#   device run:  command "bash benchmarks/gpu_run.sh main", carry [".whl"], timeout_s 560
#                command "bash benchmarks/gpu_run.sh ablations" for the per-piece numbers (a second call)
# ../shared/bench does not travel with the repository: before the call, copy it in (untracked files travel):
#   mkdir -p shared && cp -r ../shared/bench shared/      (the script then finds ./shared/bench/peer_baseline.py;
#   it also looks in $PHITUNE_PEER_DIR and ../shared/bench). Remove ./shared afterwards.
# Budget: "main" is sized for about 7 minutes (model init dominates: ~30 s per child process).
#
# Before spending device time, on any CPU:  DRY_RUN=1 bash benchmarks/gpu_run.sh
# checks both parts ("main" and "ablations") without a GPU: the shell syntax, every benchmark command's arguments
# and variant names (train_throughput.py --dry-run), that the GPU tests collect (imports), and the environment
# lines; it trains nothing and exits non-zero if any check failed (tests/test_benchmarks.py runs it).
set -u -o pipefail
dry=${DRY_RUN:-0}
if [ "$dry" = 1 ]; then
  OUT=${OUT:-$(mktemp -d)}
  bash -n "$0" || exit 1
else
  OUT=${OUT:-/tmp/phitune_gpu_out}
fi
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
failed=0
if [ "$dry" = 1 ]; then
  :  # the wheels are for the device; nothing to install here
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [ ! -e ../shared/bench/peer_baseline.py ] && [ -z "${PHITUNE_PEER_DIR:-}" ] && [ -e shared/bench/peer_baseline.py ]; then
  export PHITUNE_PEER_DIR=$PWD/shared/bench
fi
what=${1:-main}
bench() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  if [ "$dry" = 1 ]; then
    python3 benchmarks/train_throughput.py --size mini --device cuda "$@" --dry-run || failed=1
    return
  fi
  timeout 300 python3 benchmarks/train_throughput.py --size mini --device cuda "$@" 2>>"$OUT/log.txt" | tee "$OUT/$name.jsonl"
}
{
  if [ "$dry" = 1 ]; then echo "nvidia-smi: not called (dry run)"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || failed=1
  python3 -c "import liger_kernel; print('liger-kernel ok')" 2>&1 | tail -1
} >"$OUT/env.txt"  # not piped: a pipe would run the block in a subshell and lose failed=1
cat "$OUT/env.txt"

gpu_tests() {
  if [ "$dry" = 1 ]; then  # collecting imports every test module: a renamed import fails here, not on the device
    python3 -m pytest -q --collect-only -m gpu tests/training/test_fast.py tests/training/test_loss.py \
      tests/training/fast/kernels -p no:cacheprovider >"$OUT/gpu_tests.txt" 2>&1 || { failed=1; tail -15 "$OUT/gpu_tests.txt"; }
    tail -1 "$OUT/gpu_tests.txt"
    return
  fi
  timeout 120 python3 -m pytest -q -m gpu tests/training/test_fast.py tests/training/test_loss.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  # the fast path's Triton kernels compiled for the device (on a CPU the suite runs them through Triton's interpreter)
  timeout 300 python3 -m pytest -q tests/training/fast/kernels 2>&1 | tail -15 | tee -a "$OUT/gpu_tests.txt"
}

main_part() {
  gpu_tests
  # 1. fixed blocks of 2048, batch 4, no checkpointing (target >= 30,000 tokens/s, <= 40 GiB)
  bench blocks_b4 --batch 4 --seq 2048 --warmup 3 --steps 8 --data blocks --peer base,liger --variants fast,plain
  # 2. gradient checkpointing, batch 8 (target >= 20,000 tokens/s, <= 14 GiB)
  bench ckpt_b8 --batch 8 --seq 2048 --warmup 2 --steps 5 --data blocks --peer liger_ckpt --variants fast+ckpt
  # 3. realistic chat lengths, batch 4: the peer pads, phitune packs (target >= 15,000 supervised tokens/s)
  bench chat_b4 --batch 4 --seq 2048 --warmup 3 --steps 8 --data chat --peer liger --variants fast
}

ablations_part() {
  # each fast-path piece off on its own, and the optional extras (Liger RMSNorm, torch.compile of the layers)
  bench ablations --batch 4 --seq 2048 --warmup 3 --steps 8 --data blocks --peer "" \
    --variants fast,no_loss,no_lora,no_mlp,no_norm,no_rope,liger,compile
  bench chat_dense --batch 4 --seq 2048 --warmup 3 --steps 8 --data chat --peer "" --variants fast,dense
}

if [ "$dry" = 1 ]; then
  main_part
  ablations_part
  echo "dry run: $([ "$failed" = 0 ] && echo "every command checked" || echo "FAILED (see above)")"
  exit "$failed"
elif [ "$what" = main ]; then
  main_part
else
  ablations_part
fi
ls -la "$OUT"
