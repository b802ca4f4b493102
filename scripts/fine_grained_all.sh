#!/usr/bin/env bash
# The 12 fine-grained datasets of a pretraining run in a row (single GPU), each into
# RUN/eval/[<student>/]fine_grained/<dataset>/, then the run's report (the table with the 12-dataset mean,
# the paper's "Fine-grained" column, beside the paper's target). Roots follow the original ./cache_data
# layout; override with DATA=.
#   scripts/fine_grained_all.sh RUN [extra fine_grained.main flags, e.g. --student vit_tiny, --multiple]
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN=${1:?usage: $0 RUN [extra flags]}
DATA=${DATA:-cache_data}
declare -A ROOT=(
  [aircraft]=raw/aircraft [caltech101]=raw/caltech101 [cars]=raw/cars [cifar10]=cifar10 [cifar100]=cifar100
  [dtd]=raw/dtd [flowers]=raw/flowers [food]=raw/food101 [pets]=raw/pets [sun397]=raw/sun397/SUN397
  [voc2007]=raw/voc2007 [cub]=raw/cub)
for d in aircraft caltech101 cars cifar10 cifar100 dtd flowers food pets sun397 voc2007 cub; do
  if python -m fine_grained.main --dataset "$d" --data-root "$DATA/${ROOT[$d]}" --pretrained "$RUN" "${@:2}"; then
    echo "== $d: done"
  else
    echo "== $d: FAILED (its fine_grained.log is under $RUN/eval/)"
  fi
done
python -m tools.report "$RUN"
