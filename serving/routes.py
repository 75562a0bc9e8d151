"""What a request's `model` means: a route's production or canary adapter version, or a pinned version.

The registry's aliases are the source of truth (`production`, `canary` on the route's adapter); a route's config may
override either version and the canary weight. Versions are resolved to numbers here, so the LLM always receives a
concrete, cacheable adapter id `name@number`, with the abstention threshold that version was calibrated with
(tandem/abstention.py), if any. RAG comes first: a route whose adapter has no production version yet answers with the
base model (variant `base`), and takes the adapter at the first refresh after it reaches production.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.abstention import Threshold, thresholds
from tandem.canary import BASE, CANARY, PRODUCTION, assign
from tandem.config import route_config
from tandem.errors import UnknownVersionError
from tandem.rollout import load as load_rollout

DEFAULT_CANARY_WEIGHT = 0.1


class RouteError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Route:
    name: str
    cfg: object  # RouteConfig
    production: str | None  # adapter id name@version; None: the base model
    canary: str | None = None
    weight: float = 0.0
    shadow: bool = False  # the canary answers copies of production's requests, logged and not returned

    @property
    def default_variant(self) -> str:
        """What users off the canary get: the production adapter, or the base model before there is one."""
        return PRODUCTION if self.production else BASE


@dataclass
class Choice:
    route: Route
    variant: str  # production | base | canary | pinned
    adapter: str | None


class RouteTable:
    def __init__(self, routes_cfg, registry, base_name: str, secret: bytes):
        self.routes_cfg = routes_cfg
        self.registry = registry
        self.base_name = base_name
        self.secret = secret  # keys the canary assignment (tandem.canary)
        self.routes: dict[str, Route] = {}
        self.pins: dict[tuple[str, str], str | None] = {}
        self.versions: list[dict] = []
        self.thresholds: dict[str, dict[str, Threshold]] = {}  # adapter id -> collection -> its abstention threshold
        self.refresh()

    def refresh(self) -> None:
        """Re-read the aliases, weights and rollout state (what a rollout step or a promotion changes), and the
        registered versions /v1/models lists: requests never wait on the registry."""
        self.routes = {name: self._resolve(name, route_config(cfg)) for name, cfg in self.routes_cfg.items()}
        self.pins = {}  # pinned `adapter@alias` ids resolve again, as of this refresh
        self.versions = self._versions(self._described())
        self.thresholds = {v["id"]: {c: Threshold(**t) for c, t in v["tandem"]["abstain_thresholds"].items()}
                           for v in self.versions}

    def _version(self, adapter: str, which: str) -> str | None:
        try:
            return f"{adapter}@{self.registry.resolve(f'{adapter}@{which}').version}"
        except UnknownVersionError:
            return None

    def _resolve(self, name: str, cfg) -> Route:
        if not cfg.adapter:
            return Route(name, cfg, None)
        production = self._version(cfg.adapter, cfg.production or PRODUCTION)
        canary = self._version(cfg.adapter, cfg.canary or CANARY)
        if production is None and canary is None:  # nothing registered or aliased yet: the base model, with RAG
            return Route(name, cfg, None)
        tags = self.registry.model_tags(cfg.adapter)
        weight = cfg.canary_weight
        if weight is None:
            weight = float(tags["canary_weight"]) if "canary_weight" in tags else DEFAULT_CANARY_WEIGHT
        rollout = load_rollout(self.registry, cfg.adapter)
        return Route(name, cfg, production, canary if canary != production else None, float(weight),
                     shadow=bool(rollout and rollout.state == "shadow"))

    def choose(self, model: str, user: str | None, key_id: str | None = None) -> Choice:
        """The variant for this request; raises RouteError (404: unknown model or version)."""
        name, _, pin = model.partition("@")
        route = self.routes.get(name) or next((r for r in self.routes.values() if r.cfg.adapter == name and pin),
                                              None)
        if route is None:
            raise RouteError(404, f"The model {model!r} does not exist; GET /v1/models lists the routes and "
                                  f"adapter versions")
        if pin:
            if not route.cfg.adapter:
                raise RouteError(404, f"route {route.name!r} serves the base model and has no versions")
            key = (route.cfg.adapter, pin)
            if key not in self.pins:
                self.pins[key] = self._version(*key)
            adapter = self.pins[key]
            if adapter is None:
                raise RouteError(404, f"The model {model!r} does not exist: {route.cfg.adapter!r} has no version "
                                      f"or alias {pin!r}")
            return Choice(route, "pinned", adapter)
        if route.canary and assign(route.name, user, route.weight, self.secret, key_id) == CANARY:
            return Choice(route, CANARY, route.canary)
        return Choice(route, route.default_variant, route.production)

    def models(self) -> list[dict]:
        """Routes and adapter versions, each with its base model as parent, for /v1/models; as of the last
        refresh."""
        return [{"id": r.name, "object": "model", "created": 0, "owned_by": "tandem", "parent": self.base_name,
                 "tandem": {"kind": "route", "rag": r.cfg.rag, "adapter": r.cfg.adapter, "variant": r.default_variant,
                            "production": r.production, "canary": r.canary, "canary_weight": r.weight,
                            "shadow": r.shadow}} for r in self.routes.values()] + self.versions

    def _described(self) -> list[dict]:
        """The registry's description of every adapter a route serves."""
        from mlflow.exceptions import MlflowException

        described = []
        for adapter in sorted({r.cfg.adapter for r in self.routes.values() if r.cfg.adapter}):
            try:
                described += self.registry.describe(adapter)
            except MlflowException:  # not registered yet: the route's entry says so
                continue
        return described

    def _versions(self, described: list[dict]) -> list[dict]:
        """Every version of the routes' adapters as a /v1/models entry, with its aliases, dataset and abstention
        thresholds by collection."""
        data = []
        for desc in described:
            by_version: dict[str, list[str]] = {}
            for alias, version in desc["aliases"].items():
                by_version.setdefault(str(version), []).append(alias)
            for v in desc["versions"]:
                data.append({"id": f"{desc['name']}@{v['version']}", "object": "model", "created": 0,
                             "owned_by": "tandem", "parent": self.base_name,
                             "tandem": {"kind": "adapter", "aliases": sorted(by_version.get(str(v["version"]), [])),
                                        "dataset": v["tags"].get("dataset"),
                                        "abstain_thresholds": {c: t.to_dict()
                                                               for c, t in thresholds(v["tags"]).items()}}})
        return data
