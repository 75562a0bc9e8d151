"""Training throughput (tokens/s of real tokens) on Ray Train: 1 vs 2 workers, DeepSpeed ZeRO-2 vs plain DDP, and
packing vs padding, on the same rows of mixed lengths (answers of one to four sentences).

    python bench/train.py [--steps 8] [--rows 96]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from jobs.dataset import main as dataset_main  # noqa: E402
from jobs.finetune import main as finetune_main  # noqa: E402
from tandem.datasets import wiki_source  # noqa: E402
from tandem.runtime import write_json  # noqa: E402

RUNS = {"1 worker, ZeRO-2": ["train.num_workers=1"], "2 workers, ZeRO-2": ["train.num_workers=2"],
        "2 workers, DDP": ["train.num_workers=2", "train.deepspeed=null"],
        "2 workers, ZeRO-2, packed": ["train.num_workers=2", "train.packing=true"]}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--workdir", default=".tandem/bench-train")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    items = list(json.loads(wiki_source().read_text()).values())[: args.rows]
    data = work / "summaries.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": f"In {i % 4 + 1} sentences, what is {v['title']}?",
                                        "response": ". ".join(v["extract"].split(". ")[: i % 4 + 1])}) + "\n"
                            for i, v in enumerate(items)))
    common = [f"workdir={work}"]
    version = dataset_main(["add", "dataset.name=bench", f"dataset.path={data}", *common])["version"]
    ray.init(num_cpus=2, include_dashboard=False)
    rows = {}
    for i, (name, overrides) in enumerate(RUNS.items()):
        manifest = finetune_main([*common, f"dataset.ref=bench@{version}", f"train.name=bench-{i}",
                                  f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}",
                                  "train.batch_size=2", "train.max_length=256", *overrides])
        rows[name] = round(manifest["metrics"]["tokens_per_s"], 1)
        print(name, rows[name], "tokens/s", flush=True)
    result = {"tokens_per_s": rows,
              "two_vs_one_worker": round(rows["2 workers, ZeRO-2"] / rows["1 worker, ZeRO-2"], 2),
              "zero2_vs_ddp": round(rows["2 workers, ZeRO-2"] / rows["2 workers, DDP"], 2),
              "packed_vs_padded": round(rows["2 workers, ZeRO-2, packed"] / rows["2 workers, ZeRO-2"], 2)}
    print(json.dumps(result, indent=2))
    write_json(Path(__file__).parent / "results" / "train.json", result)
    return result


if __name__ == "__main__":
    main()
