#!/usr/bin/env bash
# The GPU run of docs/runs/: warm-start a ~15M-parameter ("20m") tiny Qwen2.5-VL with papo sft, then train it
# with PAPO-G for a few hundred steps. Stage 1 and 2 are separate so each fits a 10-minute call:
#   bash scripts/gpu_run.sh sft OUT_DIR            # writes WORK/sft20 and OUT_DIR/{sft20.log, sft_metrics.jsonl, checkpoints.json}
#   bash scripts/gpu_run.sh train OUT_DIR          # trains from the best WORK/sft20 checkpoint into WORK/rl20
#   STEPS=300 bash scripts/gpu_run.sh train-default OUT_DIR   # trains the embedded default instead
# WORK (scratch space, default \${TMPDIR:-/tmp}/papo-gpu) must survive between the two calls.
set -uo pipefail
stage=$1; out=$2
export PYTHONUNBUFFERED=1 PAPO_SFT_WORKERS=12
work=${WORK:-${TMPDIR:-/tmp}/papo-gpu}
mkdir -p "$out" "$work"
if [ "$stage" = sft ]; then
  timeout 500 python3 -m papo sft --model 20m --steps 3000 --batch-size 64 --lr 1e-3 --save-steps 1000,2000 \
      --eval-per-task 30 --eval-k 2 --out $work/sft20 --device cuda > "$out/sft20.log" 2>&1
  cp $work/sft20/sft_metrics.jsonl "$out/" 2>/dev/null
  python3 scripts/pick_checkpoint.py $work/sft20 $work/pick20 --no-pack > "$out/pick.txt"
  cp $work/pick20/checkpoints.json "$out/"
  cat "$out/pick.txt"
else
  # stage "train" starts from the best SFT checkpoint; stage "train-default" from the embedded default model
  if [ "$stage" = train ]; then
    best=$(WORK="$work" python3 -c "import json, os; w = os.environ['WORK']; r = json.load(open(w + '/pick20/checkpoints.json'))['ranking'][0]; print(w + '/sft20' if r == 'final' else w + '/sft20/' + r)")
  else
    best=default
  fi
  echo "training from $best"
  timeout 530 python3 -m papo train --model "$best" --max-steps "${STEPS:-200}" --device cuda --out $work/rl20 \
      --set trainer.save_every=100 --set trainer.log_samples_every=50 > "$out/train.log" 2>&1
  for f in metrics.jsonl report.md heldout_before.json heldout_after.json config.yaml; do cp "$work/rl20/$f" "$out/" 2>/dev/null; done
  tar czf "$out/plots.tar.gz" -C $work/rl20 plots samples 2>/dev/null
  tail -c 1500 "$out/train.log"
fi
