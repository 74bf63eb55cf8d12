#!/usr/bin/env bash
# Train the demo's tiny VLM with `attn-mod train`: curriculum1 -> curriculum2 -> qa, each stage
# starting from the previous stage's final model (configs/train/tiny_demo_*.yaml).
#   scripts/train_tiny_demo.sh plain           # SFT only
#   scripts/train_tiny_demo.sh agto            # the same + AGTO losses (lambda_img = lambda_sys = 0.15)
# ROOT (default runs/tiny_demo) holds data/, init/ and <variant>/<stage>/; a finished stage (final/) is skipped.
# TORCH_THREADS (default 1) threads per run; then scripts/tiny_demo_curves.py evaluates the checkpoints.
set -euo pipefail
variant=${1:?usage: scripts/train_tiny_demo.sh plain|agto}
root=${ROOT:-runs/tiny_demo}
py=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${TORCH_THREADS:-1}
case $variant in
  plain) extra=() ;;
  agto) extra=(objective.lambda_img=0.15 objective.lambda_sys=0.15) ;;
  *) echo "variant must be plain or agto, got $variant" >&2; exit 2 ;;
esac
[ -f "$root/data/qa.jsonl" ] || "$py" -m attn_mod.data.synthetic "$root/data"
[ -f "$root/init/config.json" ] || "$py" -c "from attn_mod.data.synthetic import save_init_model; save_init_model('$root/init')"
prev=$root/init
for stage in curriculum1 curriculum2 qa; do
  out=$root/$variant/$stage
  if [ ! -f "$out/final/config.json" ]; then
    start=$(date +%s)
    "$py" -m attn_mod train "configs/train/tiny_demo_$stage.yaml" model.path="$prev" \
      data.train="$root/data/$stage.jsonl" output_dir="$out" logging.progress=false "${extra[@]}" \
      $( [ -d "$out/checkpoints" ] && echo --resume )
    echo "{\"stage\": \"$stage\", \"wall_s\": $(( $(date +%s) - start ))}" >> "$root/$variant/wall.jsonl"
  fi
  prev=$out/final
done
echo "final model: $prev"
