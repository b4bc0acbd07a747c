#!/usr/bin/env bash
# On a CUDA machine: time packing, the paper estimate, single-run speed and the technique
# overheads, then run the deep study with the CUDA tests beside it, then extras, and write
# their figures, within BUDGET_S seconds (default 540: one call of at most 10 minutes, with
# room to start and stop).
#
#   bash benchmarks/gpu.sh                 # figures into benchmarks/results/gpu-<date>/
#   OUT=/some/folder bash benchmarks/gpu.sh
#   PYTHON=/path/to/python bash benchmarks/gpu.sh   # an interpreter with reslab and torch
#   ARCHIVE=/some/figures.tgz bash benchmarks/gpu.sh  # also keep a tar of the figures, renewed
#                                                    # after every step (machines taken back)
#   ONLY="cuda-tests pack-speed" bash benchmarks/gpu.sh   # only the steps named
#   LIST=/some/file bash benchmarks/gpu.sh   # run nothing: write each step's command there
#                                            # (tests/test_gpu_script.py parses them on the CPU)
#
# Each step's output goes to its own file (and the terminal); summary.txt names the card, the
# driver and torch, and each step's exit status and seconds. Steps run in order of what the
# project needs most; a step that would end past the budget is cut short (exit 124) and the
# ones after it are skipped. Copy the tables into benchmarks/README.md, "GPU", with the
# card's name, and the deep study's report into docs/evidence/. Exit status: 2 when no CUDA
# device is visible, else the CUDA tests' status.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${LIST:-}" ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu.sh: no CUDA device visible to $PYTHON (or no torch); run this on a GPU machine" >&2
  exit 2
fi
# The card's machine may have no copy of Fashion-MNIST and no network: say so now, not after
# every step has tried to download it.
if [ -z "${LIST:-}" ] && ! "$PYTHON" -c 'from reslab.engine.data.fashion import load_fashion
load_fashion(None, download=False, verify=False)' >/dev/null 2>&1; then
  echo "gpu.sh: Fashion-MNIST is not on this machine: put its four files in \$RESLAB_DATA/fashion-mnist/" >&2
  exit 2
fi
deadline=$((SECONDS + ${BUDGET_S:-540}))
out="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}"
if [ -n "${LIST:-}" ]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; : > "$LIST"; fi
mkdir -p "$out"
if [ -z "${LIST:-}" ]; then
  "$PYTHON" - > "$out/summary.txt" <<'PY'
import platform, torch
print("card:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
print("python:", platform.python_version())
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$out/summary.txt" 2>/dev/null || true
  cat "$out/summary.txt"
fi

archive() {
  [ -n "${ARCHIVE:-}" ] || return 0
  local part="$ARCHIVE.$BASHPID.part"  # steps run beside each other archive too
  # the figures, not the weights and checkpoints of the runs
  if tar czf "$part" --exclude=checkpoint --exclude='*.safetensors' --exclude='*.pt' -C "$out" . 2>/dev/null; then mv "$part" "$ARCHIVE"; else rm -f "$part"; fi
}

step() {  # [CAP=S] step NAME COMMAND...: run within what is left of the budget (and at most CAP
  # seconds), tee to NAME.txt, record
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local left=$((deadline - SECONDS))
  if [ -n "${CAP:-}" ] && [ "$CAP" -lt "$left" ]; then left=$CAP; fi
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped, the budget is spent" | tee -a "$out/summary.txt"
    return 124
  fi
  if [ -n "${LIST:-}" ]; then  # one line per step: its name, then its arguments, NUL-separated
    printf '%s\0' "$name" "$@" >> "$LIST"; printf '\n' >> "$LIST"
    return 0
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  timeout -k 10 "$left" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  archive
  return "$rc"
}

compare=("$PYTHON" -m reslab compare)

# Measured (benchmarks/README.md, "GPU"): on an H100 the timed steps 1-4 take about 3.5 minutes
# and the CUDA tests about 4 (beside two training grids); the deep study took about 4 on an
# H200. They fit one call of 10 minutes only with the tests beside the study; the extras after
# them run with what is left.

# 1. Timings, alone on the card, what issue 19 asks first: packed runs (reslab.engine.packed,
#    both routes) against one run at a time, same card, same call; at least 5x at 16 resnet56
#    runs and 10x at 32 resnet20 runs. --graphs adds the grouped pack replayed as a CUDA graph
#    (issue 29: at least 8x and 25x), its start-up, TFLOP/s and fraction of the card's bf16 peak
#    (a warm-up, a capture and a few replays more per size: seconds)
step pack-speed "$PYTHON" benchmarks/pack_speed.py --device cuda --width 1 --rounds 3 --steps 3 \
  --configs resnet56:16:512,resnet20:32:128 --graphs
# 2. the paper preset's estimated time on this card (at most 45 minutes on one H100), from its
#    own timing pass and pack probe
step paper-estimate "${compare[@]}" --preset paper --device cuda --estimate --out "$out/paper-estimate"
# 3. one run with its step replayed as a CUDA graph (cuda_graphs) against the hand loop: 1.5x wanted
step train-speed-graphs "$PYTHON" benchmarks/train_speed.py --device cuda --train-subset 0 --rounds 2 --workers 8 \
  --cuda-graphs
# 4. each technique's step time over baseline's, in the engine's bf16, eager and replayed as a graph
step technique-overhead "$PYTHON" benchmarks/technique_overhead.py --device cuda --batch 256 --rounds 11 --steps 10
step technique-overhead-graphs "$PYTHON" benchmarks/technique_overhead.py --device cuda --batch 256 --rounds 11 \
  --steps 10 --cuda-graphs --no-eager

# 5. The deep study at realistic length: resnet56, full width, all the training images, 5
#    epochs, 3 seeds (one pack each), every article technique; its report is the project's
#    evidence (docs/evidence/). A pack that fails leaves its runs failed: the same command
#    with --pack 1 trains them alone. The CUDA tests time nothing, so they run beside it, once
#    its timing pass (the report's step-time ratios) has run alone; each test is stopped
#    after 240 s.
deep=(--models resnet56 --techniques scale,norm,fusion --seeds 3 --no-until-decided --width 1 --epochs 5
  --batch-size 512 --device cuda --quiet --out "$out/deep-study")
{ step deep-study "${compare[@]}" "${deep[@]}" --pack 3 || step deep-study-alone "${compare[@]}" "${deep[@]}" --pack 1; } &
deep_pid=$!
if [ -n "${LIST:-}" ]; then wait "$deep_pid"; fi  # one writer of the list at a time
for _ in $(seq 120); do
  if [ -e "$out/deep-study/timing.json" ] || ! kill -0 "$deep_pid" 2>/dev/null; then break; fi
  sleep 1
done
step cuda-tests "$PYTHON" -m pytest -q -m cuda tests -p no:cacheprovider -o timeout=240 --durations=15
tests_rc=$?
wait "$deep_pid"
mkdir -p "$out/evidence" && cp "$out/deep-study/"{report.md,decisions.json,summary.csv,grid.json} "$out/evidence/" 2>/dev/null

# 5b. One call of the accumulating evidence study (reslab evidence, issue 29), alone on the card, with
#    what is left of the budget (at most its default 8 minutes; ONLY=evidence gives it the whole call).
#    It continues docs/evidence/ from its committed runs (run folders in the ignored
#    results/evidence-work/, kept on a warm machine so a stopped pack resumes); its three files are
#    copied to $out/evidence-study/ so they come back: commit them to docs/evidence/, then run
#    'python -m reslab.report.evidence --readme'.
ev_budget=$((deadline - SECONDS - 30))
if [ "$ev_budget" -gt 480 ]; then ev_budget=480; fi
if [ "$ev_budget" -lt 60 ]; then ev_budget=60; fi
step evidence "$PYTHON" -m reslab evidence --device cuda --budget "${ev_budget}s" --out docs/evidence
[ -n "${LIST:-}" ] || { mkdir -p "$out/evidence-study" && cp docs/evidence/{runs.jsonl,summary.json,study.md} "$out/evidence-study/" 2>/dev/null; }

# 6. Extras, alone again, with what is left of the budget (ONLY="..." runs them in a call of their own):
# a graphed pack's start-up as train_pack has it (data, route check and measurement, members,
# warm-up, capture, first step; issue 29: at most 20 s), one short epoch per size, no speed table
CAP=180 step pack-startup "$PYTHON" benchmarks/pack_speed.py --device cuda --width 1 --rounds 0 \
  --configs resnet56:16:512,resnet20:32:128 --train-pack-startup
# the overheads in a pack (8 resnet20 runs of one technique): each row's packed img/s over baseline's row
tpack=resnet20:8:128
for t in scale skipinit layerscale norm fusion; do tpack+=",resnet20:8:128:$t"; done
step pack-overhead "$PYTHON" benchmarks/pack_speed.py --device cuda --width 1 --rounds 3 --steps 3 --configs "$tpack"
step train-speed "$PYTHON" benchmarks/train_speed.py --device cuda --train-subset 0 --rounds 2 --workers 8
# a grid of 16 resnet56 runs (one technique, 16 seeds: one pack) end to end, packed against one
# run at a time (compare --pack; start-up included)
grid16=(--models resnet56 --techniques baseline --seeds 16 --no-until-decided --width 1 --epochs 1
  --train-subset 8192 --batch-size 512 --device cuda --no-probe --quiet)
step grid16-packed "${compare[@]}" "${grid16[@]}" --pack 16 --out "$out/grid16-packed"
step grid16-alone "${compare[@]}" "${grid16[@]}" --pack 1 --out "$out/grid16-alone"
step inference-speed "$PYTHON" benchmarks/inference_speed.py --device cuda --batch 1024 --channels-last --rounds 7 --iters 10
# baseline resnet56 at 10 and 20 epochs, beside each other (nothing timed): how far from its
# plateau the paper preset's 10 epochs end. Full width, all 55,000 training images, batch 512,
# 3 seeds packed.
plateau=(--models resnet56 --techniques baseline --seeds 3 --no-until-decided --width 1 --batch-size 512
  --device cuda --pack 3 --no-probe --quiet)
CAP=${PLATEAU_CAP:-400} step plateau-e10 "${compare[@]}" "${plateau[@]}" --epochs 10 --out "$out/plateau-e10" &
p10=$!
if [ -n "${LIST:-}" ]; then wait "$p10"; fi
CAP=${PLATEAU_CAP:-400} step plateau-e20 "${compare[@]}" "${plateau[@]}" --epochs 20 --out "$out/plateau-e20"
wait "$p10"
[ -n "${LIST:-}" ] || echo "figures in $out"
archive
exit "$tests_rc"
