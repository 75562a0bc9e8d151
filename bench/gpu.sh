#!/usr/bin/env bash
# The GPU figures, on one GPU in under 8 minutes (each step has its own time limit), for the README and
# docs/scaling.md: embedding throughput (raw encode and the Ray Data pipeline with one GPU actor), QLoRA steps with
# CUDA bitsandbytes (NF4 vs bf16 LoRA at 1.1B), the HF engine with 8 adapters (gathered LoRA vs PEFT) and its
# continuous vs static batching, and both engines with 8 adapters under the serving load (bench/engines.py).
# Results: bench/results/*.json, and a log per step in $OUT (default bench/results/gpu).
#
#     bash bench/gpu.sh            # on a machine with the project set up (make setup) and a CUDA torch
#
# The vLLM engine runs when .venv-vllm holds a CUDA vLLM (`make setup-vllm VLLM_PACKAGE=vllm`, which needs the
# package index); otherwise the engines step measures the HF engine alone.
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

step embedding 100 "$PY" bench/index.py --docs 3000 --workdir .tandem/bench-gpu \
    embedder.num_gpus=1 embedder.num_cpus=1 embedder.encode_batch_size=256
step qlora 100 "$PY" bench/qlora_memory.py --model llama-1b --steps 3
step lora_kernel 60 "$PY" bench/lora_kernel.py --device cuda --burst 64 --max-tokens 64 --rounds 3
step batching 60 "$PY" bench/batching.py --device cuda --requests 60 --rate 4
engines=hf
.venv-vllm/bin/python -c "import torch, vllm; assert torch.cuda.is_available()" 2>/dev/null && engines=hf,vllm
# vLLM's actor holds the GPU (num_gpus=1) and leaves room for the HF engine run before it in this process
step engines 150 "$PY" bench/engines.py --engines "$engines" --requests 60 --rate 4 --burst 64 \
    serve.llm.num_gpus=1 serve.llm.vllm.gpu_memory_utilization=0.5 serve.llm.vllm.dtype=bfloat16
for f in index qlora_memory-llama-1b lora_kernel batching engines; do
    [ -f "bench/results/$f.json" ] && cp "bench/results/$f.json" "$OUT/"
done
exit $failed
