#!/usr/bin/env bash
# The GPU figures, on one GPU in about 10 minutes (each step has its own time limit), for the README and
# docs/scaling.md: embedding throughput (raw encode and the Ray Data pipeline with one GPU actor), QLoRA steps with
# CUDA bitsandbytes (NF4 vs bf16 LoRA at 1.1B), the HF engine with 8 adapters (gathered LoRA vs PEFT, on the bf16
# and on the 4-bit base) and its continuous vs static batching, and both engines with 8 adapters under the serving
# load (bench/engines.py). Results: bench/results/*.json, and a log per step in $OUT (default bench/results/gpu).
#
#     bash bench/gpu.sh            # on a machine with the project set up (make setup) and a CUDA torch
#
# The vLLM engine runs when .venv-vllm holds a CUDA vLLM (`make setup-vllm VLLM_PACKAGE=vllm`, which needs the
# package index); otherwise the engines step measures the HF engine alone.
#
# On a bare GPU machine without a package index (the device tool here) there is no .venv: the image's python3 and
# CUDA torch run it, with the project's pins of the rest as wheels in .whl (bitsandbytes, transformers, peft,
# omegaconf, hydra-core, antlr4). The steps that need Ray are skipped there (Ray's wheel alone is 79 MB, more than
# travels), and the HF engine steps run on random weights of the default base's shape, built from .gpu-base (its
# config and tokenizer): throughput depends on shapes, not on trained values, and every request generates exactly
# its max_tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
if [ ! -x "$PY" ] && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    PY=python3
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'this torch sees no GPU'" || exit 1
"$PY" -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee "$OUT/versions.txt"
base=()
if [ -f .gpu-base/config.json ]; then
    "$PY" -c "
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
config = AutoConfig.from_pretrained('.gpu-base')
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained('/tmp/gpu-base')
AutoTokenizer.from_pretrained('.gpu-base').save_pretrained('/tmp/gpu-base')" || exit 1
    base=(--model-path /tmp/gpu-base)
fi

failed=0
step() {  # name, seconds, command...: its output in $OUT/name.log; a failed or timed-out step does not stop the rest
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || { failed=1; tail -5 "$OUT/$name.log"; }
}

ray=1
"$PY" -c "import ray" 2>/dev/null || { ray=0; echo "embedding, engines: skipped (no Ray in this Python)"; }
[ "$ray" -eq 0 ] || step embedding 100 "$PY" bench/index.py --docs 3000 --workdir .tandem/bench-gpu \
    embedder.num_gpus=1 embedder.num_cpus=1 embedder.encode_batch_size=256
step qlora 150 "$PY" bench/qlora_memory.py --model llama-1b --steps 3
# sized for the HF engine's ~50 ms a step on an H100 (launch-bound: docs/scaling.md), not for the GPU's arithmetic
step lora_kernel 120 "$PY" bench/lora_kernel.py --device cuda --burst 16 --max-tokens 32 --rounds 3 "${base[@]}"
step lora_kernel_nf4 120 "$PY" bench/lora_kernel.py --device cuda --burst 16 --max-tokens 32 --rounds 3 \
    --quantization nf4 "${base[@]}"
step batching 150 "$PY" bench/batching.py --device cuda --requests 20 --rate 4 "${base[@]}"
if [ "$ray" -eq 1 ]; then
    engines=hf
    .venv-vllm/bin/python -c "import torch, vllm; assert torch.cuda.is_available()" 2>/dev/null && engines=hf,vllm
    # vLLM's actor holds the GPU (num_gpus=1) and leaves room for the HF engine run before it in this process
    step engines 150 "$PY" bench/engines.py --engines "$engines" --requests 60 --rate 4 --burst 64 \
        serve.llm.num_gpus=1 serve.llm.vllm.gpu_memory_utilization=0.5 serve.llm.vllm.dtype=bfloat16
fi
for f in index qlora_memory-llama-1b lora_kernel lora_kernel-nf4 batching engines; do
    [ -f "bench/results/$f.json" ] && cp "bench/results/$f.json" "$OUT/"
done
exit $failed
