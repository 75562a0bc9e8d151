"""The Serve application: Retriever and LLM deployments behind the Router, sized from `serve.*` config.

`build_app(cfg)` is what `python -m serving` runs; `app(args)` is the builder `serve run` / `serve deploy` and a
RayService call with a config file (conf/serve/tandem.yaml), its args being overrides of conf/serve.yaml.
"""

from __future__ import annotations

from omegaconf import OmegaConf
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from serving.llm import LLM
from serving.retriever import Retriever
from serving.rollout_controller import RolloutController
from serving.router import Router
from serving.vllm_engine import vllm_python
from tandem.config import load_config, route_config
from tandem.errors import ConfigError
from tandem.keys import KeyStore, auth_mode
from tandem.milvus import is_server_uri
from tandem.models import prepare_base


def build_app(cfg) -> Application:
    """The app for `cfg`. The base model is prepared here, once, where the app is built; replicas only load it."""
    s = cfg.serve
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    for route in s.routes.values():
        route_config(route)  # a typo in a route fails here, not in a replica
    if s.llm.engine == "vllm":  # vLLM's environment is there, and the config is one it serves; replicas get the
        # absolute path, as their working directory may not be this one
        cfg = OmegaConf.merge(cfg, {"serve": {"llm": {"vllm": {"python": str(vllm_python(s.llm))}}}})
        s = cfg.serve
    elif s.llm.engine != "hf":
        raise ConfigError(f"serve.llm.engine={s.llm.engine}: expected hf or vllm")
    auth_mode(cfg.auth.mode, s.host, KeyStore(cfg.auth.keys_file))  # keyless beyond loopback fails here too
    if not is_server_uri(cfg.store.uri) and (s.retriever.autoscaling or s.retriever.num_replicas > 1):
        raise ValueError(f"store.uri={cfg.store.uri} is Milvus Lite, which one process opens: use one retriever "
                         f"replica (no autoscaling) or a Milvus server URI (http://...)")
    retriever = serve.deployment(Retriever).options(
        name="Retriever", max_ongoing_requests=s.retriever.max_ongoing_requests,
        max_queued_requests=s.retriever.max_queued_requests, **_scaling(s.retriever),
        ray_actor_options={"num_cpus": s.retriever.num_cpus},
    ).bind(cfg)
    llm = serve.deployment(LLM).options(
        name="LLM", max_ongoing_requests=s.llm.max_ongoing_requests, max_queued_requests=s.llm.max_queued_requests,
        **_scaling(s.llm),
        # with vLLM, its actor holds the replica's GPUs
        ray_actor_options={"num_cpus": s.llm.num_cpus, "num_gpus": s.llm.num_gpus if s.llm.engine == "hf" else 0},
    ).bind(cfg, base)
    controller = serve.deployment(RolloutController).options(
        name="RolloutController", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(cfg) if s.controller else None
    # A full queue answers 429 with Retry-After, from the proxy (Router) or from the Router (LLM, Retriever): the
    # client is told to come back instead of waiting in a queue it cannot see the end of.
    return Router.options(num_replicas=s.router_replicas, max_ongoing_requests=s.router_max_ongoing_requests,
                          max_queued_requests=s.router_max_queued_requests,
                          backpressure_config=BackpressureConfig(status_code=429, retry_after_s=s.retry_after_s),
                          ).bind(cfg, base, retriever, llm, controller)


def _scaling(d) -> dict:
    """A fixed `num_replicas`, or Serve's autoscaling (Serve refuses both at once); optionally spread over nodes."""
    options = {"autoscaling_config": dict(d.autoscaling)} if d.autoscaling else {"num_replicas": d.num_replicas}
    if d.max_replicas_per_node:
        options["max_replicas_per_node"] = d.max_replicas_per_node
    return options


def app(args: dict) -> Application:
    """`serve run conf/serve/tandem.yaml`: args {overrides: [key=value, ...]} over conf/serve.yaml."""
    return build_app(load_config("serve", list(args.get("overrides") or [])))
