"""Every deployment file under cluster/ checked against its schema, and against what Tandem will do with it.

Kubernetes objects: the Kubernetes 1.33 OpenAPI schemas in strict mode (kubernetes-validate), so an unknown or
misspelt field fails. KubeRay custom resources: tests/schemas/kuberay-v1.json, whose pod templates, services and
resources are checked by those same Kubernetes schemas. The `ray up` file: Ray's own cluster-config schema and
checks. The Serve config inside the RayService: Ray Serve's schema, and it must be conf/serve/tandem.yaml. The
RayJob entrypoints: real jobs whose overrides compose against Tandem's typed config.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.33.0"
HELM_VALUES = {"milvus/values-distributed.yaml"}
NOT_KUBERNETES = {"aws.yaml", "kustomization.yaml", *HELM_VALUES}


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        name = str(path.relative_to(CLUSTER))
        if name not in NOT_KUBERNETES:
            out += [(name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


DOCS = documents()
KUSTOMIZATION = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())


def k8s_registry() -> referencing.Registry:
    """The strict Kubernetes definitions, under the id the KubeRay schema refers to them by."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    strict = root / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    definitions = referencing.Resource.from_contents(json.loads(strict.read_text()))
    return referencing.Registry().with_resource("/api/_definitions.json", definitions)


def validate_against(schema_file: str, pointer: str, instance) -> None:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    registry = k8s_registry().with_resource(schema["$id"], referencing.Resource.from_contents(schema))
    validator = jsonschema.Draft202012Validator({"$ref": schema["$id"] + pointer}, registry=registry)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in DOCS if doc["kind"] == kind]


def config_map(name: str) -> dict:
    return next(doc["data"] for _, doc in of_kind("ConfigMap") if doc["metadata"]["name"] == name)


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) of the RayCluster and of the cluster inside the RayService."""
    return [(name, doc["spec"].get("rayClusterConfig", doc["spec"]))
            for name, doc in of_kind("RayCluster") + of_kind("RayService")]


def ray_groups() -> list[tuple[str, dict]]:
    """(file, group) of every head and worker group of those clusters."""
    return [(name, group) for name, spec in ray_cluster_specs()
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


@pytest.mark.parametrize("name,doc", [d for d in DOCS if not d[1]["apiVersion"].startswith("ray.io/")],
                         ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}")
def test_kubernetes_objects_match_the_kubernetes_schemas(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name,doc", [d for d in DOCS if d[1]["apiVersion"].startswith("ray.io/")],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kuberay_resources_match_the_crd_schema(name, doc):
    validate_against("kuberay-v1.json", f"#/$defs/{doc['kind']}", doc)


def test_the_schemas_catch_mistakes():
    """The strict checks above are only worth something if a typo fails them."""
    cluster = json.loads(json.dumps(of_kind("RayCluster")[0][1]))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8  # misspelt KubeRay field
    with pytest.raises(AssertionError, match="maxReplica"):
        validate_against("kuberay-v1.json", "#/$defs/RayCluster", cluster)
    cluster = json.loads(json.dumps(of_kind("RayCluster")[0][1]))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envfrom"] = []  # misspelt pod field
    with pytest.raises(AssertionError, match="envfrom"):
        validate_against("kuberay-v1.json", "#/$defs/RayCluster", cluster)
    deployment = json.loads(json.dumps(of_kind("Deployment")[0][1]))
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 80
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    values = yaml.safe_load((CLUSTER / "milvus/values-distributed.yaml").read_text())
    values["pulsar"]["enabled"] = True  # two message queues
    with pytest.raises(AssertionError):
        validate_against("milvus-helm-values.json", "", values)


def test_milvus_distributed_values_match_the_chart():
    for name in HELM_VALUES:
        validate_against("milvus-helm-values.json", "", yaml.safe_load((CLUSTER / name).read_text()))


def test_kustomization_holds_every_object_and_every_reference_resolves():
    listed = set(KUSTOMIZATION["resources"])
    jobs = {name for name, doc in DOCS if doc["kind"] == "RayJob"}  # created one run at a time
    assert {name for name, _ in DOCS} == listed | jobs
    for generator in KUSTOMIZATION["configMapGenerator"]:
        for file in generator["files"]:
            json.loads((CLUSTER / file).read_text())

    defined = {(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS if "name" in doc["metadata"]}
    defined |= {("ConfigMap", g["name"]) for g in KUSTOMIZATION["configMapGenerator"]}
    wanted = set()

    def walk(node):
        if isinstance(node, dict):
            if "configMapRef" in node:
                wanted.add(("ConfigMap", node["configMapRef"]["name"]))
            if "configMap" in node and isinstance(node["configMap"], dict):
                wanted.add(("ConfigMap", node["configMap"]["name"]))
            if "persistentVolumeClaim" in node:
                wanted.add(("PersistentVolumeClaim", node["persistentVolumeClaim"]["claimName"]))
            if "serviceAccountName" in node:
                wanted.add(("ServiceAccount", node["serviceAccountName"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, doc in DOCS:
        walk(doc)
    assert wanted <= defined, f"referenced but not defined: {wanted - defined}"
    for name, doc in of_kind("RayJob"):
        selected = doc["spec"]["clusterSelector"]["ray.io/cluster"]
        assert ("RayCluster", selected) in defined, name
    namespace = KUSTOMIZATION["namespace"]  # nothing may pin another one
    assert {doc["metadata"].get("namespace", namespace) for _, doc in DOCS} == {namespace}
    assert {s.get("namespace") for _, doc in of_kind("RoleBinding") for s in doc["subjects"]} == {namespace}


def test_site_addresses_are_the_services_defined_here():
    site = config_map("tandem-site")
    services = {doc["metadata"]["name"]: {p["port"] for p in doc["spec"]["ports"]} for _, doc in of_kind("Service")}
    for key in ("TANDEM_MILVUS_URI", "MLFLOW_TRACKING_URI", "RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST"):
        host, port = site[key].removeprefix("http://").split(":")
        assert int(port) in services[host], key
    for _, group in ray_groups():
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert site["TANDEM_HOME"] in {m["mountPath"] for m in mounts}


def test_every_ray_pod_gets_the_image_the_site_the_shared_volume_and_token_auth():
    for name, spec in ray_cluster_specs():
        assert spec["authOptions"]["mode"] == "token", name
    for name, group in ray_groups():
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == KUSTOMIZATION["images"][0]["name"], name
        assert {"configMapRef": {"name": "tandem-site"}} in container["envFrom"], name
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "tandem-shared" for v in pod["volumes"])
        if "nvidia.com/gpu" in container["resources"]["limits"]:
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name


def test_prometheus_scrapes_the_port_ray_exports_metrics_on_and_grafana_reads_prometheus():
    ray_job = next(j for j in yaml.safe_load(config_map("prometheus")["prometheus.yml"])["scrape_configs"]
                   if j["job_name"] == "ray")
    port_rule = next(r for r in ray_job["relabel_configs"]
                     if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"])
    for name, group in ray_groups():
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports[port_rule["regex"]] == int(group["rayStartParams"]["metrics-export-port"]), name
    datasource, = yaml.safe_load(config_map("grafana-provisioning")["datasources.yaml"])["datasources"]
    assert datasource["url"] == config_map("tandem-site")["RAY_PROMETHEUS_HOST"]


def test_only_the_serve_port_is_reachable_from_outside_the_namespace():
    policies = [doc["spec"] for _, doc in of_kind("NetworkPolicy")]
    everyone = [p for p in policies if p["podSelector"] == {}]  # selects every pod in the namespace
    assert everyone and all(p["policyTypes"] == ["Ingress"] for p in everyone)
    assert all(rule.get("from") == [{"podSelector": {}}] for p in everyone for rule in p["ingress"])
    opened = [p for p in policies if p["podSelector"] != {}]
    (name, service), = of_kind("RayService")
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    for p in opened:  # beyond the namespace: the Serve proxy's port alone, on the pods KubeRay marks as serving
        assert p["podSelector"] == {"matchLabels": {"ray.io/serve": "true"}}
        assert all([x["port"] for x in rule["ports"]] == [port] for rule in p["ingress"])
    assert all(doc["spec"].get("type", "ClusterIP") == "ClusterIP" for _, doc in of_kind("Service"))
    assert "auth:\n  mode: keys" in (ROOT / "conf/site/cluster.yaml").read_text()  # and that port asks for API keys


def test_grafana_has_no_anonymous_access_and_its_password_comes_from_a_secret():
    (_, grafana), = [d for d in of_kind("Deployment") if d[1]["metadata"]["name"] == "grafana"]
    env = {e["name"]: e for e in grafana["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GF_AUTH_ANONYMOUS_ENABLED"]["value"] == "false" and "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert env["GF_SECURITY_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "grafana-admin",
                                                                              "key": "password"}


def test_rayservice_serves_conf_serve_tandem_yaml_on_the_cluster_site(tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app
    from tandem.errors import ConfigError
    from tandem.keys import KeyStore

    (name, service), = of_kind("RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    local = yaml.safe_load((ROOT / "conf/serve/tandem.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    # the two differences the file's comment names, and nothing else
    local["http_options"]["host"] = "0.0.0.0"
    local["applications"][0]["args"]["overrides"] = ["site=cluster"]
    assert served == local
    # the cluster site serves with vLLM from the image's environment (cluster/Dockerfile sets TANDEM_VLLM_PYTHON;
    # here, make setup-vllm's); without it the app is refused where it is built
    monkeypatch.setenv("TANDEM_VLLM_PYTHON", str(tmp_path / "no-vllm" / "python"))
    with pytest.raises(ConfigError, match="make setup-vllm"):
        app({"overrides": served["applications"][0]["args"]["overrides"]})
    monkeypatch.setenv("TANDEM_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    # the cluster site refuses to serve without API keys, and builds with them: Serve accepts its autoscaling and
    # placement options
    args = served["applications"][0]["args"]
    keys = tmp_path / "keys.json"
    with pytest.raises(ConfigError, match="holds no active key"):
        app({"overrides": [*args["overrides"], f"auth.keys_file={keys}"]})
    KeyStore(keys).create("service", ["chat:*"])
    assert app({"overrides": [*args["overrides"], f"auth.keys_file={keys}"]}) is not None


@pytest.mark.parametrize("name,doc", of_kind("RayJob"), ids=lambda v: v if isinstance(v, str) else "")
def test_rayjob_entrypoints_are_jobs_with_valid_overrides(name, doc, monkeypatch):
    from tandem.config import load_config

    site = config_map("tandem-site")
    for key, value in site.items():  # the environment every Ray pod gets
        monkeypatch.setenv(key, value)

    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), argv
    job = argv[2].removeprefix("jobs.")
    assert (ROOT / "jobs" / f"{job}.py").exists(), job
    assert "site=cluster" in argv
    cfg = load_config(job, argv[3:])  # unknown keys or wrong types fail here
    assert (cfg.workdir, cfg.store.uri, cfg.mlflow.tracking_uri) == (
        site["TANDEM_HOME"], site["TANDEM_MILVUS_URI"], site["MLFLOW_TRACKING_URI"])


def test_ray_up_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert [t for t in types.values() if t["resources"].get("GPU")], "no GPU worker type"


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template here: Deployments, StatefulSets and every Ray group."""
    plain = [(f"{name}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
             for name, doc in of_kind("Deployment") + of_kind("StatefulSet")]
    return plain + [(f"{name}:{group.get('groupName', 'head')}", group["template"]["spec"])
                    for name, group in ray_groups()]


READ_ONLY_ROOT = {"grafana", "prometheus"}  # the rest write beside their binaries or under /tmp (Ray's sessions)


def test_every_pod_runs_as_a_user_without_privileges():
    for where, pod in pod_specs():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            own = container["securityContext"]
            assert own["allowPrivilegeEscalation"] is False and own["capabilities"] == {"drop": ["ALL"]}, where
            assert own["readOnlyRootFilesystem"] is (container["name"] in READ_ONLY_ROOT), where
            if own["readOnlyRootFilesystem"]:  # what it writes is a volume
                volumes = {v["name"]: v for v in pod["volumes"]}
                writable = {m["mountPath"] for m in container["volumeMounts"]
                            if "emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]]}
                assert writable, where
    milvus = yaml.safe_load((CLUSTER / "milvus/values-distributed.yaml").read_text())
    assert milvus["securityContext"]["runAsNonRoot"] is True
    assert milvus["minio"]["existingSecret"] == "minio-credentials"  # never the chart's minioadmin/minioadmin


def test_serving_pods_read_api_keys_and_the_user_hmac_key_from_secrets():
    from tandem.config import load_config

    keys_file = Path(load_config("serve", ["site=cluster"]).auth.keys_file)
    (name, service), = of_kind("RayService")
    spec = service["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # a Router replica may land on any of them
        pod = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] in secrets)
        assert secrets[mount["name"]] == "tandem-api-keys" and mount["readOnly"] is True
        assert Path(mount["mountPath"]) == keys_file.parent
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["TANDEM_USER_HMAC_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "tandem-user-hmac"


def test_ray_up_publishes_nothing_on_all_interfaces_and_shares_nothing_world_writable():
    text = (CLUSTER / "aws.yaml").read_text()
    config = yaml.safe_load(text)
    commands = " ".join(str(c) for key in ("initialization_commands", "head_start_ray_commands",
                                          "worker_start_ray_commands") for c in config[key])
    commands += " ".join(c for t in config["available_node_types"].values()
                         for c in t.get("initialization_commands", []))
    words = shlex.split(commands.replace("$(hostname -I | cut -d' ' -f1)", "PRIVATE_IP"))
    published = [after for before, after in zip(words, words[1:]) if before == "-p" and ":" in after]  # docker run
    assert len(published) == 3 and all(p.startswith("PRIVATE_IP:") for p in published), published
    assert "--dashboard-host=127.0.0.1" in commands and "--dashboard-host=0.0.0.0" not in commands
    modes = [m for m in commands.split() if m.isdigit() and len(m) in (3, 4)]
    assert "chmod" in commands and all(int(m[-1]) & 2 == 0 for m in modes), modes  # no write for others
