#!/usr/bin/env bash
# The GPU figures, on one GPU in under 8 minutes (each step has its own time limit), for the README and
# docs/scaling.md: embedding throughput (raw encode and the Ray Data pipeline with one GPU actor), QLoRA steps with
# CUDA bitsandbytes (NF4 vs bf16 LoRA at 1.1B), and the HF engine with 8 adapters (gathered LoRA vs PEFT) and its
# continuous vs static batching. Results: bench/results/*.json, and a log per step in $OUT (default bench/results/gpu).
#
#     bash bench/gpu.sh            # on a machine with the project set up (make setup) and a CUDA torch
#
# The vLLM engine is not in it: it is not built yet (issue #14).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'this torch sees no GPU'; print(torch.__version__)" || exit 1

failed=0
step() {  # name, seconds, command...: its output in $OUT/name.log; a failed or timed-out step does not stop the rest
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || { failed=1; tail -5 "$OUT/$name.log"; }
}

step embedding 120 "$PY" bench/index.py --docs 3000 --workdir .tandem/bench-gpu \
    embedder.num_gpus=1 embedder.num_cpus=1 embedder.encode_batch_size=256
step qlora 120 "$PY" bench/qlora_memory.py --model llama-1b --steps 3
step lora_kernel 90 "$PY" bench/lora_kernel.py --device cuda --burst 64 --max-tokens 64 --rounds 3
step batching 120 "$PY" bench/batching.py --device cuda --requests 60 --rate 4
for f in index qlora_memory-llama-1b lora_kernel batching; do
    [ -f "bench/results/$f.json" ] && cp "bench/results/$f.json" "$OUT/"
done
exit $failed
