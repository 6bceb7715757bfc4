#!/usr/bin/env bash
# The controlled regime of docs/RESULTS.md ("a regime like the paper's starting point") on one GPU, in stages
# that each fit a 10-minute call; WORK (default ${TMPDIR:-/tmp}/papo-regime) must survive between them:
#   MASKED_SHARE=0 BLANK_SHARE=0 bash scripts/regime_run.sh sft OUT   # leg 1: a 100m model learns to read the images
#   FROM=WORK/start SFT_OUT=WORK/start2 bash scripts/regime_run.sh sft OUT   # leg 2: continues it, now with masked and black views
#   START=WORK/start2 bash scripts/regime_run.sh rl OUT    # reproduce.py's plan from that model, on train data with a language-prior shortcut
# The families are clocks and bar charts, the two a from-scratch model learns to read within a call (object
# scenes stayed at chance for 4,000 steps), with cue=1: the question names the colour they are drawn in, which
# the shortcut keys on. The warm start sees unbiased data (no shortcut), then 30% masked and 10% black images,
# so that it answers those views with prior-driven text and KL_prcp starts small; RL trains on the train split
# with shortcut=$SHORTCUT (the question's colour suggests the answer that often), and the held-out test split
# ignores the shortcut, so only reading the image pays there. A view with the image blackened still trains the
# full answer, so views from the first step teach answering without looking; they come in a second leg. Knobs
# (environment): MODEL, FROM, SFT_OUT, START, FAMILIES, MASKED_SHARE, BLANK_SHARE, SFT_SECONDS or SFT_STEPS, SFT_LR, SHORTCUT,
# RL_SECONDS, RL_LR, METHODS, SEEDS, JOBS, PROMPTS (per step), PLAN, DEVICE (cuda).
set -uo pipefail
stage=$1; out=$2
export PYTHONUNBUFFERED=1 PAPO_SFT_WORKERS=${PAPO_SFT_WORKERS:-12}
work=${WORK:-${TMPDIR:-/tmp}/papo-regime}
families=${FAMILIES:-clock+bar_chart}
knobs="cue=1&explain=1&size=224"
mkdir -p "$out" "$work"
if [ "$stage" = sft ]; then
  data="synthetic:$families?$knobs"
  sft_out=${SFT_OUT:-$work/start}  # leg 2: SFT_OUT=WORK/start2, so that leg 1's model stays
  if [ -n "${SFT_STEPS:-}" ]; then
    steps=$SFT_STEPS ms="-"
  else
    python3 benchmarks/sft_step.py --model "${MODEL:-100m}" --batch-size 64 --steps 10 --device "${DEVICE:-cuda}" --data "$data" \
        > "$out/sft_step.txt" 2>&1
    ms=$(grep -o "sft's default: [0-9]* ms" "$out/sft_step.txt" | grep -o '[0-9]*')  # the step papo sft runs
    # a 100m step takes 215-231 ms in papo sft's loop against 124 ms alone (H200)
    steps=$(( ${SFT_SECONDS:-400} * 1000 / (2 * ${ms:-300} + 30) ))
  fi
  echo "model step ${ms} ms -> $steps SFT steps" | tee "$out/sft_plan.txt"
  timeout $(( ${SFT_SECONDS:-400} + 200 )) python3 -m papo sft --model "${FROM:-${MODEL:-100m}}" --data "$data" --steps $steps \
      --batch-size 64 --lr "${SFT_LR:-5e-4}" --masked-share "${MASKED_SHARE:-0.3}" --blank-share "${BLANK_SHARE:-0.1}" \
      --eval-per-task 50 --eval-k 2 \
      --max-new-tokens 160 --save-steps $((steps / 2)) --out "$sft_out" --device "${DEVICE:-cuda}" > "$out/sft.log" 2>&1
  cp "$sft_out/sft_metrics.jsonl" "$sft_out/sft_result.json" "$sft_out/sft_loss.png" "$out/" 2>/dev/null
  cat "$out/sft_plan.txt"; tail -c 1500 "$out/sft.log"
else
  start=${START:-$work/start}
  [ -f "$start/config.json" ] || start="$start/step-$(ls "$start" | grep -o 'step-[0-9]*' | grep -o '[0-9]*' | sort -n | tail -1)"
  echo "RL from $start"
  prompts=${PROMPTS:-32}
  timeout $(( ${RL_SECONDS:-480} + 60 )) python3 experiments/reproduce.py --plan "${PLAN:-main}" ${METHODS:+--methods "$METHODS"} --seeds "${SEEDS:-2}" \
      --jobs "${JOBS:-4}" --budget-s "${RL_SECONDS:-480}" --eval-reserve-s 120 --model "$start" --device "${DEVICE:-cuda}" \
      --set "data.train=synthetic:$families?$knobs&shortcut=${SHORTCUT:-60}" \
      --set rollout.n=5 --set rollout.max_new_tokens=160 --set rollout.top_p=0.99 \
      --set trainer.rollout_batch_size=$prompts --set trainer.mini_batch_size=$((prompts / 2)) \
      --set trainer.log_kl_prcp=true --set optim.lr="${RL_LR:-2e-5}" \
      --eval-data "synthetic:$families?split=test&$knobs&n={n}" --eval-n 300 --eval-k 4 \
      --eval-max-new-tokens 160 --out "$work/runs" --results "$out/reproduction.json" --markdown "$out/RESULTS.md" \
      > "$out/rl.log" 2>&1
  # metrics and evaluations only (the runs' checkpoints stay in WORK): one archive
  (cd "$work/runs" && tar czf "$out/runs.tar.gz" --exclude='checkpoints' --exclude='final' --exclude='*.safetensors' .)
  tail -c 2500 "$out/rl.log"; cat "$out/RESULTS.md" 2>/dev/null | head -40
fi
