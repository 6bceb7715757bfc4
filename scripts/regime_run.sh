#!/usr/bin/env bash
# The controlled regime of docs/RESULTS.md ("a regime like the paper's starting point") on one GPU, in stages
# that each fit a 10-minute call; WORK (default ${TMPDIR:-/tmp}/papo-regime) must survive between them:
#   bash scripts/regime_run.sh warmstart OUT   # a 100m model learns to read the images, then sees masked and black ones
#   bash scripts/regime_run.sh rl OUT          # reproduce.py's plan from it, with and without a language-prior shortcut
#   bash scripts/regime_run.sh extend OUT      # the same runs, continued for another RL_SECONDS (evaluated again)
#   bash scripts/regime_run.sh warmstart+rl OUT  # both in one call: RL trains (not evaluated) for what the warm
#                                              # start leaves of CALL_SECONDS (500), to RL_STEPS (default 1000)
# OUT collects logs and results (tar it where a machine returns few files). Three calls make a comparison:
#   warmstart+rl, then RL_STEPS=1000 RL_EVAL=0 RL_SECONDS=490 extend, then RL_SECONDS=460 extend (sized to the
#   pace the runs showed, evaluated); a warm start that leaves under 120 s starts RL in the second call instead.
#
# RL trains and is evaluated on clock reading (FAMILIES), with cue=1: the question names the colour the clock
# is drawn in, which the shortcut keys on, and explain=1: most of a response is reasoning. The warm start
# also sees bar charts (WARM_FAMILIES): on clocks alone leg 1 stayed at chance for 900 steps, while with bar
# charts beside them it read clocks from about step 500 (docs/RESULTS.md). It has two legs:
#   1. full images only, unbiased data, with held-out checks every STEPS/9 steps; the checkpoint whose RL
#      families (FAMILIES) lie inside [0.2, 0.8], then with their mean accuracy nearest PICK_TARGET (0.35:
#      leg 2 raises it further), is kept (scripts/pick_checkpoint.py); judged by all families, a checkpoint
#      that read bar charts but not yet clocks was once picked, and RL started at chance. The leg ends at
#      the first check where every RL family reaches PICK_TARGET (EARLY_STOP=0 trains all STEPS);
#   2. from it, 30% masked and 10% black images at half the learning rate, so that the model answers those
#      views with prior-driven text and KL_prcp starts small. A blackened view still trains the full answer,
#      so views from the first step would teach answering without looking: they come second.
# RL trains on the train split with shortcut=S for each S in SHORTCUTS (the question's colour suggests that
# answer on S% of prompts; 0 is the control), all at once, each in its own runs folder, the CPU threads split
# between them; the held-out test split ignores the shortcut, so only reading the image pays there.
# The passes run eagerly (model.compile_layers=false): compiling them took about 130 s of a 110M run's first
# step, more than it saves in a call. Knobs (environment): MODEL, WARM_FAMILIES, FAMILIES, SFT_STEPS (leg 1),
# VIEW_STEPS (leg 2), SFT_LR, PICK_TARGET, EVAL_PER_TASK (warm-start checks), SFT_EAGER_EVAL (1, the default: those
# checks sample without compiling the engine, whose first compile costs more than a leg's checks save; 0 compiles),
# START (the RL start; default the warm start), SHORTCUTS (default "0 60"), RL_SECONDS, RL_LR, METHODS (default
# GRPO,PAPO-G; empty for the whole PLAN), SEEDS (1; SEED_LIST=2 runs seed 2 alone: one block of arms per call, the
# seeds of a comparison spread over sessions, each paired within its own warm start), JOBS (runs at once per
# shortcut, 2), PROMPTS (per step, 64), EVAL_N (RL held-out questions, 300), MPS (1: share the GPU through CUDA MPS where its daemon exists), PLAN, DEVICE (cuda).
# An ablation beside its baseline: PLAN=all METHODS="GRPO,PAPO-G,PAPO-G + double entropy" JOBS=3; the methods after
# PAPO beside theirs: PLAN=perception METHODS= JOBS=6 RL_SETS=algorithm.filter_fallback=kept. RL_SETS: more
# config overrides for the RL runs, space-separated (RL_SETS="rollout.compile=false").
# RL_STEPS=N trains every run to step N without a probe (the probe's runs restart, which cost about a minute of
# each rl call); at RL_SECONDS the runs get a SIGTERM, save their last step and stop. The next call's `extend`
# continues them, to RL_STEPS (the new total) or, without it, as far as RL_SECONDS allows at the pace the last
# call measured over its last steps (plan.json); a run slower than that ends where the evaluation's 120 s begin
# and is evaluated at the step it reached. RL_EVAL=0 trains only and leaves evaluation to a later call.
set -uo pipefail
stage=$1; out=$2
export PYTHONUNBUFFERED=1 PAPO_SFT_WORKERS=${PAPO_SFT_WORKERS:-12}
work=${WORK:-${TMPDIR:-/tmp}/papo-regime}
families=${FAMILIES:-clock}
warm_families=${WARM_FAMILIES:-clock+bar_chart}
knobs="cue=1&explain=1&size=224"
device=${DEVICE:-cuda}
mkdir -p "$out" "$work"

sft() {  # name, from, steps, lr, masked share, black share, save steps, stop-at
  timeout 480 python3 -m papo sft --model "$2" --data "synthetic:$warm_families?$knobs" --steps "$3" --batch-size 64 --lr "$4" \
      --masked-share "$5" --blank-share "$6" ${7:+--save-steps "$7"} ${8:+--stop-at "$8"} \
      --eval-per-task "${EVAL_PER_TASK:-100}" --eval-k 2 --max-new-tokens 160 $([ "${SFT_EAGER_EVAL:-1}" = 1 ] && echo --eager-eval) \
      --out "$work/$1" --device "$device" > "$out/$1.log" 2>&1
  cp "$work/$1/sft_metrics.jsonl" "$out/$1_metrics.jsonl" 2>/dev/null
  tail -c 900 "$out/$1.log"
}

warmstart() {
  steps=${SFT_STEPS:-900} lr=${SFT_LR:-5e-4}
  # leg 1 ends at the first check where every RL family reaches PICK_TARGET: later checks lie further from it
  stop_at=$([ "${EARLY_STOP:-1}" = 1 ] && tr '+' '\n' <<< "$families" | sed "s/\$/=${PICK_TARGET:-0.35}/" | paste -sd,)
  sft leg1 "${MODEL:-100m}" "$steps" "$lr" 0 0 "$(seq -s, $((steps / 9)) $((steps / 9)) $((steps - 1)))" "$stop_at"
  python3 scripts/pick_checkpoint.py "$work/leg1" "$out/pick" --no-pack --families "$families" --target "${PICK_TARGET:-0.35}" | tee "$out/pick.txt"
  best=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['ranking'][0])" "$out/pick/checkpoints.json" 2>/dev/null) \
    || { echo "leg 1 wrote no held-out check to pick from: see $out/leg1.log" >&2; exit 1; }
  [ "$best" = final ] && from="$work/leg1" || from="$work/leg1/$best"
  echo "leg 2 from $from" | tee -a "$out/pick.txt"
  sft start "$from" "${VIEW_STEPS:-250}" "$(python3 -c "print($lr / 2)")" 0.3 0.1 ""
  cp "$work/start/sft_result.json" "$out/start_result.json" 2>/dev/null
}

rl() {  # stage: rl | extend
  local stage=$1
  start=${START:-$work/start}
  echo "RL from $start"
  prompts=${PROMPTS:-64} shortcuts=${SHORTCUTS:-0 60} jobs=${JOBS:-2} methods=${METHODS-GRPO,PAPO-G}
  arms=$(wc -w <<< "$shortcuts")
  # CUDA MPS lets the runs' kernels overlap instead of time-slicing the GPU (16 small runs on an H100: 2.27 s a
  # step against 7.75 s, docs/RESULTS.md); its daemon lives for this stage only. MPS=0 leaves it off.
  if [ "${MPS:-1}" = 1 ] && [ "$device" = cuda ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY="$work/mps/pipe" CUDA_MPS_LOG_DIRECTORY="$work/mps/log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
      trap 'echo quit | nvidia-cuda-mps-control' EXIT
      echo "CUDA MPS daemon started"
    else  # no daemon, or a client cannot reach the GPU through it
      echo quit | nvidia-cuda-mps-control 2> /dev/null
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
      echo "CUDA MPS unavailable here; the runs time-slice the GPU"
    fi
  fi
  # every run's image processing and host work shares the cores: oversubscribed, a step's encode took 4 s, not 0.4
  threads=$(( $(nproc) / (jobs * arms) > 0 ? $(nproc) / (jobs * arms) : 1 ))
  extra=(); for set in ${RL_SETS:-}; do extra+=(--set "$set"); done
  pids=()
  seconds=${RL_SECONDS:-480}
  if [ -n "${RL_STEPS:-}" ]; then
    sizing=(--steps "$RL_STEPS")  # a stop at the time limit saves every run's last step
  else
    sizing=(--budget-s "$seconds" --eval-reserve-s 120); seconds=$((seconds + 60))  # sized to end before it
  fi
  [ "${RL_EVAL:-1}" = 0 ] && sizing+=(--no-eval)
  for sc in $shortcuts; do
    mkdir -p "$out/sc$sc"
    timeout -k 60 "$seconds" python3 experiments/reproduce.py --plan "${PLAN:-main}" ${methods:+--methods "$methods"} \
        --seeds "${SEEDS:-1}" ${SEED_LIST:+--seed-list "$SEED_LIST"} --jobs "$jobs" --threads "$threads" "${sizing[@]}" \
        $([ "$stage" = extend ] && echo --extend) --model "$start" --device "$device" \
        --set "data.train=synthetic:$families?$knobs&shortcut=$sc" \
        --set rollout.n=5 --set rollout.max_new_tokens=160 --set rollout.top_p=0.99 \
        --set trainer.rollout_batch_size=$prompts --set trainer.mini_batch_size=$((prompts / 2)) \
        --set trainer.log_kl_prcp=true --set optim.lr="${RL_LR:-2e-5}" --set model.compile_layers=false ${extra[@]+"${extra[@]}"} \
        --eval-data "synthetic:$families?split=test&$knobs&n={n}" --eval-n "${EVAL_N:-300}" --eval-k 4 \
        --eval-max-new-tokens 160 --out "$work/runs-sc$sc" --results "$out/sc$sc/reproduction.json" \
        --markdown "$out/sc$sc/RESULTS.md" --section "shortcut-$sc" > "$out/sc$sc/rl.log" 2>&1 &
    pids+=($!)
  done
  status=0  # the stage's: the first arm's failure (124: its RL_SECONDS limit stopped it, as `timeout` reports), else 0
  for pid in "${pids[@]}"; do wait "$pid" || { rc=$?; [ "$status" = 0 ] && status=$rc; }; done
  for sc in $shortcuts; do
    # metrics and evaluations only (the runs' checkpoints stay in WORK): one archive per arm
    (cd "$work/runs-sc$sc" && tar czf "$out/sc$sc/runs.tar.gz" --exclude='checkpoints' --exclude='final' --exclude='*.safetensors' .)
    echo "== shortcut $sc"; tail -c 1200 "$out/sc$sc/rl.log"; head -8 "$out/sc$sc/RESULTS.md" 2>/dev/null
  done
  return "$status"
}

case $stage in
  warmstart) warmstart ;;
  rl | extend) rl "$stage" ;;
  warmstart+rl)  # the warm start, then RL trains (unevaluated) for what is left of CALL_SECONDS
    began=$SECONDS
    warmstart || exit
    left=$(( ${CALL_SECONDS:-500} - (SECONDS - began) ))
    [ "$left" -ge 120 ] || { echo "the warm start left ${left} s of CALL_SECONDS: RL starts in the next call (rl)"; exit 0; }
    RL_SECONDS=$left RL_STEPS=${RL_STEPS:-1000} RL_EVAL=0 rl rl ;;
  *) echo "usage: regime_run.sh warmstart|rl|extend|warmstart+rl OUT" >&2; exit 2 ;;
esac
