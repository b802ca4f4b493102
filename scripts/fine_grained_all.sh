#!/usr/bin/env bash
# The 12 fine-grained datasets in a row (single GPU), then the table with their mean (the paper's
# "Fine-grained" column). Roots follow the original ./cache_data layout; override with DATA=.
#   scripts/fine_grained_all.sh output/pretrain/student_backbone.pth [extra flags, e.g. --multiple]
set -uo pipefail
CKPT=${1:?usage: $0 CHECKPOINT [extra flags]}
ARCH=${ARCH:-vit_small}
DATA=${DATA:-cache_data}
OUT=${OUT:-output/fine_grained/$(basename "${CKPT%.*}")_${ARCH}}
declare -A ROOT=(
  [aircraft]=raw/aircraft [caltech101]=raw/caltech101 [cars]=raw/cars [cifar10]=cifar10 [cifar100]=cifar100
  [dtd]=raw/dtd [flowers]=raw/flowers [food]=raw/food101 [pets]=raw/pets [sun397]=raw/sun397/SUN397
  [voc2007]=raw/voc2007 [cub]=raw/cub)
for d in aircraft caltech101 cars cifar10 cifar100 dtd flowers food pets sun397 voc2007 cub; do
  if python -m fine_grained.main --dataset "$d" --data-root "$DATA/${ROOT[$d]}" --arch "$ARCH" --patch-size 14 \
       --pretrained "$CKPT" --output-dir "$OUT/$d" "${@:2}"; then
    echo "== $d: done"
  else
    echo "== $d: FAILED (see $OUT/$d/fine_grained.log)"
  fi
done
python -m fine_grained.summarize "$OUT"
