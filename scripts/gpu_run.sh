#!/usr/bin/env bash
# The GPU run of docs/runs/: warm-start a ~15M-parameter ("20m") tiny Qwen2.5-VL with papo sft, then train it
# with PAPO-G for a few hundred steps. Stage 1 and 2 are separate so each fits a 10-minute call:
#   bash scripts/gpu_run.sh sft OUT_DIR      # writes /tmp/sft20 and OUT_DIR/{sft20.log, sft_metrics.jsonl, checkpoints.json}
#   bash scripts/gpu_run.sh train OUT_DIR    # trains from the best /tmp/sft20 checkpoint into /tmp/rl20
set -uo pipefail
stage=$1; out=$2
export PYTHONUNBUFFERED=1 PAPO_SFT_WORKERS=12
mkdir -p "$out"
if [ "$stage" = sft ]; then
  timeout 500 python3 -m papo sft --model 20m --steps 3000 --batch-size 64 --lr 1e-3 --save-steps 1000,2000 \
      --eval-per-task 30 --eval-k 2 --out /tmp/sft20 --device cuda > "$out/sft20.log" 2>&1
  cp /tmp/sft20/sft_metrics.jsonl "$out/" 2>/dev/null
  python3 scripts/pick_checkpoint.py /tmp/sft20 /tmp/pick20 --no-pack > "$out/pick.txt"
  cp /tmp/pick20/checkpoints.json "$out/"
  cat "$out/pick.txt"
else
  # stage "train" starts from the best SFT checkpoint; stage "train-default" from the embedded default model
  if [ "$stage" = train ]; then
    best=$(python3 -c "import json; r=json.load(open('/tmp/pick20/checkpoints.json'))['ranking'][0]; print('/tmp/sft20' if r == 'final' else '/tmp/sft20/' + r)")
  else
    best=default
  fi
  echo "training from $best"
  timeout 530 python3 -m papo train --model "$best" --max-steps "${STEPS:-200}" --device cuda --out /tmp/rl20 \
      --set trainer.save_every=100 --set trainer.log_samples_every=50 > "$out/train.log" 2>&1
  for f in metrics.jsonl report.md heldout_before.json heldout_after.json config.yaml; do cp "/tmp/rl20/$f" "$out/" 2>/dev/null; done
  tar czf "$out/plots.tar.gz" -C /tmp/rl20 plots samples 2>/dev/null
  tail -c 1500 "$out/train.log"
fi
