#!/usr/bin/env bash
# "Too little pretraining?" check for a finished quick benchmark: pretrain one strategy for STEPS
# steps (quick uses 200) on the benchmark's store, fine-tune PE and nodule from it at 25% and 100%
# of the labels with the same profile, and print the test metrics to compare with the benchmark's
# random-init rows (same store, so the same patient splits).
#
#   bash experiments/pretrain_budget_check.sh STORE [STRATEGY=masked_region] [STEPS=1500] [PROFILE=quick]
#
# Measured 2026-11-26 on the 2-core CPU (masked_region, 1500 steps, ~15 min + ~4 min of fine-tuning):
# PE slice AUROC 0.695 / 0.704 (random 0.680 / 0.714), per-nodule Dice 0.206 / 0.242 (random 0.226 /
# 0.211) at 25% / 100% labels; the pretext loss was flat after ~200 steps. See experiments/profiles/quick.yaml.
set -euo pipefail
STORE=${1:?usage: pretrain_budget_check.sh STORE [STRATEGY] [STEPS] [PROFILE]}
STRATEGY=${2:-masked_region}
STEPS=${3:-1500}
PROFILE=${4:-quick}
LOG=$(mktemp -d)
ctssl pretrain --task "$STRATEGY" --profile "$PROFILE" --set train.steps="$STEPS" --store "$STORE" --no-progress 2>&1 \
    | tee "$LOG/pretrain.log"
RUN=$(grep -o "pretrain-$STRATEGY-random-[0-9-]*-[0-9a-f]*" "$LOG/pretrain.log" | head -1)
[ -n "$RUN" ] || { echo "pretraining did not report a run id; see $LOG/pretrain.log" >&2; exit 1; }
for task in pe nodule; do
  for f in 0.25 1.0; do
    ctssl finetune --task "$task" --init "$RUN" --fraction "$f" --profile "$PROFILE" --store "$STORE" --quiet
  done
done
echo "compare with the random-init rows of the benchmark on $STORE (dashboard Overview/Compare, or summary.md)"
