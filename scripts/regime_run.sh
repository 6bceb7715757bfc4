#!/usr/bin/env bash
# The controlled regime of docs/RESULTS.md ("a regime like the paper's starting point") on one GPU, in stages
# that each fit a 10-minute call; WORK (default ${TMPDIR:-/tmp}/papo-regime) must survive between them:
#   MASKED_SHARE=0 BLANK_SHARE=0 bash scripts/regime_run.sh sft OUT   # leg 1: a 100m model learns to read the images
#   FROM=WORK/start bash scripts/regime_run.sh sft OUT                # leg 2: continues it, now with masked and black views
#   bash scripts/regime_run.sh rl OUT    # reproduce.py's plan from that model, on train data with a language-prior shortcut
# The warm start sees unbiased data (no shortcut), 30% masked and 10% black images, so that it answers those views
# with prior-driven text and KL_prcp starts small; RL trains on the train split of the same families with
# shortcut=$SHORTCUT (the question text suggests the answer that often), and the held-out test split ignores the
# shortcut, so only reading the image pays there. A view with the image blackened still trains the full
# answer, so views from the first step teach answering without looking; they come in a second leg. Knobs
# (environment): MODEL, FROM, MASKED_SHARE, BLANK_SHARE, SFT_SECONDS, SFT_LR, SHORTCUT,
# RL_SECONDS, RL_LR, METHODS, SEEDS, JOBS, PROMPTS (per step), PLAN, DEVICE (cuda).
set -uo pipefail
stage=$1; out=$2
export PYTHONUNBUFFERED=1 PAPO_SFT_WORKERS=${PAPO_SFT_WORKERS:-12}
work=${WORK:-${TMPDIR:-/tmp}/papo-regime}
families="count+count_subtract+closest"
mkdir -p "$out" "$work"
if [ "$stage" = sft ]; then
  data="synthetic:$families?explain=1&size=224"
  python3 benchmarks/sft_step.py --model "${MODEL:-100m}" --batch-size 64 --steps 10 --device "${DEVICE:-cuda}" --data "$data" \
      > "$out/sft_step.txt" 2>&1
  ms=$(grep -o "sft's default: [0-9]* ms" "$out/sft_step.txt" | grep -o '[0-9]*')  # the step papo sft runs
  # a 100m step took 241 ms in papo sft's loop against 124 ms alone (H200, before the loop stopped waiting per step)
  steps=$(( ${SFT_SECONDS:-400} * 1000 / (2 * ${ms:-300} + 30) ))
  echo "model step ${ms} ms -> $steps SFT steps" | tee "$out/sft_plan.txt"
  timeout $(( ${SFT_SECONDS:-400} + 150 )) python3 -m papo sft --model "${FROM:-${MODEL:-100m}}" --data "$data" --steps $steps \
      --batch-size 64 --lr "${SFT_LR:-5e-4}" --masked-share "${MASKED_SHARE:-0.3}" --blank-share "${BLANK_SHARE:-0.1}" \
      --eval-per-task 50 --eval-k 2 \
      --max-new-tokens 160 --save-steps $((steps / 2)) --out "$work/start" --device "${DEVICE:-cuda}" > "$out/sft.log" 2>&1
  cp "$work/start/sft_metrics.jsonl" "$work/start/sft_result.json" "$work/start/sft_loss.png" "$out/" 2>/dev/null
  cat "$out/sft_plan.txt"; tail -c 1500 "$out/sft.log"
else
  start="$work/start"
  [ -f "$start/config.json" ] || start="$work/start/step-$(ls "$work/start" | grep -o 'step-[0-9]*' | grep -o '[0-9]*' | sort -n | tail -1)"
  echo "RL from $start"
  prompts=${PROMPTS:-32}
  timeout $(( ${RL_SECONDS:-480} + 60 )) python3 experiments/reproduce.py --plan "${PLAN:-main}" ${METHODS:+--methods "$METHODS"} --seeds "${SEEDS:-2}" \
      --jobs "${JOBS:-4}" --budget-s "${RL_SECONDS:-480}" --eval-reserve-s 120 --model "$start" --device "${DEVICE:-cuda}" \
      --set "data.train=synthetic:$families?explain=1&shortcut=${SHORTCUT:-60}&size=224" \
      --set rollout.n=5 --set rollout.max_new_tokens=160 --set rollout.top_p=0.99 \
      --set trainer.rollout_batch_size=$prompts --set trainer.mini_batch_size=$((prompts / 2)) \
      --set trainer.log_kl_prcp=true --set optim.lr="${RL_LR:-2e-5}" \
      --eval-data "synthetic:$families?split=test&explain=1&size=224&n={n}" --eval-n 300 --eval-k 4 \
      --eval-max-new-tokens 160 --out "$work/runs" --results "$out/reproduction.json" --markdown "$out/RESULTS.md" \
      > "$out/rl.log" 2>&1
  # metrics and evaluations only (the runs' checkpoints stay in WORK): one archive
  (cd "$work/runs" && tar czf "$out/runs.tar.gz" --exclude='checkpoints' --exclude='final' --exclude='*.safetensors' .)
  tail -c 2500 "$out/rl.log"; cat "$out/RESULTS.md" 2>/dev/null | head -40
fi
