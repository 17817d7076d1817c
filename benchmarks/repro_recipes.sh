#!/bin/bash
# Do training recipes give the same weights on two trees? Runs seven tiny recipes (every training step) on
# zoo:mnist-tiny with each tree's code and prints the weights hash of each result.
#     git worktree add ../before 295dc0d   # the tree before the training-settings refactor
#     benchmarks/repro_recipes.sh ../before . runs/repro
# (cd's warmup is explicit on the new tree: before the refactor it was min(100, steps // 10) = 1 here)
set -u
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); OUT=$(mkdir -p "$3" && cd "$3" && pwd)
PY=$NEW/.venv/bin/python
cd /tmp  # python -m puts the working directory first on sys.path: it must not be a checkout
for tree in old new; do
  if [ $tree = old ]; then PP=$OLD; else PP=$NEW; fi
  for r in "finetune(steps=12,batch_size=32,bf16=true)" "kd(s=2,steps=12,batch_size=32,bf16=true)" \
           "lowrank(r=2,steps=12,batch_size=32,bf16=true)" "lora(r=2,steps=12,batch_size=32,bf16=true)" \
           "pd(from=4,to=2,steps_per_round=12,convert_steps=6,batch_size=16,bf16=true)" \
           "oneshot(teacher_nfe=4,steps=12,pairs=64,convert_steps=6,batch_size=16)" \
           "cd(steps=12,batch_size=16,n=6,warmup=1)"; do
    name=${r%%(*}
    if [ $tree = old ] && [ "$name" = cd ]; then r="cd(steps=12,batch_size=16,n=6)"; fi
    d=$OUT/$tree/$name
    mkdir -p "$OUT/$tree"
    OMP_NUM_THREADS=1 PYTHONPATH=$PP $PY -m leandiff.cli compress zoo:mnist-tiny --recipe "$r" --out "$d" --device cpu \
      > "$d.log" 2>&1 || { echo "$tree $name FAILED (see $d.log)"; continue; }
    echo "$tree $name $(PYTHONPATH=$NEW $PY -c "from leandiff.checkpoint import load_checkpoint as l; print(l('$d').hash())") $r"
  done
done
