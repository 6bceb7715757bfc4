#!/usr/bin/env bash
# The GPU run of docs/runs/: warm-start a ~15M-parameter ("20m") tiny Qwen2.5-VL with papo sft, then train it
# with PAPO-G for a few hundred steps. Each stage fits one 10-minute call:
#   bash scripts/gpu_run.sh sft OUT_DIR            # measures the step time, then SFT sized to SFT_SECONDS (340)
#   FROM=WORK/sft-0/step-N SEED=1 bash scripts/gpu_run.sh sft OUT_DIR   # a second SFT leg from a checkpoint
#   RL_LR=3e-5 STEPS=300 bash scripts/gpu_run.sh train OUT_DIR   # PAPO-G from the best checkpoint of the last SFT leg
#   STEPS=300 bash scripts/gpu_run.sh train-default OUT_DIR   # trains the embedded default instead
# WORK (scratch space, default \${TMPDIR:-/tmp}/papo-gpu) must survive between the calls. The sft stage also
# writes the picked checkpoint (bf16 weights) to OUT as best.tar.gz.part-*, for machines that do not keep WORK.
set -uo pipefail
stage=$1; out=$2
export PYTHONUNBUFFERED=1 PAPO_SFT_WORKERS=12
work=${WORK:-${TMPDIR:-/tmp}/papo-gpu}
seed=${SEED:-0}
mkdir -p "$out" "$work"
if [ "$stage" = sft ]; then
  python3 benchmarks/sft_step.py --model 20m --batch-size 64 --steps 20 --device cuda --profile > "$out/sft_step.txt" 2>&1
  ms=$(grep -o "sft's default: [0-9]* ms" "$out/sft_step.txt" | grep -o '[0-9]*')  # the step papo sft runs
  # in bf16 the loop's host work weighs more: a 100m step takes 215-231 ms in papo sft's loop against 124 ms alone (H200)
  steps=$(( ${SFT_SECONDS:-340} * 1000 / (2 * ${ms:-200} + 20) ))
  echo "model step ${ms} ms -> $steps SFT steps" | tee "$out/sft_plan.txt"
  timeout 520 python3 -m papo sft --model "${FROM:-20m}" --steps $steps --batch-size 64 --lr ${LR:-1e-3} --seed $seed \
      --save-steps $((steps / 2)),$((steps * 3 / 4)) --eval-per-task 30 --eval-k 2 --out $work/sft-$seed --device cuda \
      > "$out/sft.log" 2>&1
  cp $work/sft-$seed/sft_metrics.jsonl "$out/sft_metrics_$seed.jsonl" 2>/dev/null
  python3 scripts/pick_checkpoint.py $work/sft-$seed $work/pick --bf16 > "$out/pick.txt"
  cp $work/pick/checkpoints.json "$out/sft_checkpoints_$seed.json"
  # the picked checkpoint travels back in parts of at most 15 MiB: cat OUT/best.tar.gz.part-* | tar xz
  split -b 15M $work/pick/best.tar.gz "$out/best.tar.gz.part-"
  echo "$work/sft-$seed" > $work/last_sft
  cat "$out/sft_plan.txt" "$out/pick.txt"; tail -c 600 "$out/sft.log"
else
  # stage "train" starts from the best SFT checkpoint; stage "train-default" from the embedded default model
  if [ "$stage" = train ]; then
    run=$(cat $work/last_sft)
    best=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['ranking'][0]; print(sys.argv[2] + ('' if r == 'final' else '/' + r))" $work/pick/checkpoints.json $run)
  else
    best=default
  fi
  echo "training from $best"
  timeout 530 python3 -m papo train --model "$best" --max-steps "${STEPS:-200}" --device cuda --out $work/rl20 \
      ${RL_LR:+--set optim.lr=$RL_LR} --set trainer.save_every=100 --set trainer.log_samples_every=50 > "$out/train.log" 2>&1
  for f in metrics.jsonl report.md heldout_before.json heldout_after.json config.yaml; do cp "$work/rl20/$f" "$out/" 2>/dev/null; done
  tar czf "$out/plots.tar.gz" -C $work/rl20 plots samples 2>/dev/null
  tail -c 1500 "$out/train.log"
fi
