#!/usr/bin/env bash
# Training tokens/s of one process against two data-parallel CPU processes (torchrun, gloo) on the same global batch:
# the cpu-quick recipe for 40 steps, the first 10 left out as warm-up (--quick: 4 steps, to check the script runs).
#   bash benchmarks/data_parallel_cpu.sh [--quick]   (TINYSEEK_SHARED_DATA defaults to ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=40 warmup_logs=1 log_every=10
if [ "${1:-}" = "--quick" ]; then steps=4 warmup_logs=0 log_every=2; fi
shared="${TINYSEEK_SHARED_DATA:-../shared/data}"
work="${TMPDIR:-/tmp}/tinyseek-data-parallel"
common=(--config cpu-quick --data "$shared/corpus/library_of_phi_gpt4.jsonl" --tokenizer "$shared/tokenizers/deepseek-coder"
        --max-steps "$steps" --set logging.log_every="$log_every" --set logging.eval_every=1000 --set logging.sample_every=1000
        --set checkpoint.every=1000 --set logging.progress_bar=false)
rm -rf "$work"
OMP_NUM_THREADS=2 python train.py "${common[@]}" --out-dir "$work/1-process-2-threads" --set data.micro_batch_size=8 >/dev/null 2>&1
OMP_NUM_THREADS=1 python train.py "${common[@]}" --out-dir "$work/1-process-1-thread" --set data.micro_batch_size=8 >/dev/null 2>&1
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train.py "${common[@]}" --out-dir "$work/2-processes-ddp" \
    --set data.micro_batch_size=4 >/dev/null 2>&1
for run in 1-process-2-threads 1-process-1-thread 2-processes-ddp; do
  python - "$work/$run" "$warmup_logs" "$log_every" "$steps" <<'PY'
import json, statistics, sys
from pathlib import Path
run, warmup_logs, log_every, steps = Path(sys.argv[1]), *map(int, sys.argv[2:])
rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
rates = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][warmup_logs:]
print(f"{run.name:<22} median {statistics.median(rates):,.0f} tokens/s over steps {warmup_logs * log_every + 1}-{steps}")
PY
done
