"""One HTML page to look at: training curves, canary vs production over time, and retrieval quality.

    python -m jobs.report route=assistant [adapter=grounded_qa@production] [report.output=PATH]

- Training: loss and eval loss by step from the adapter version's MLflow run.
- Traffic: per variant and time bucket, requests, error rate and p95 latency from the request log, with the rollout
  decisions marked where they happened.
- Retrieval: recall@10, MRR@10 and nDCG@10 per mode from the last jobs.eval_retrieval report.
- Answer quality: the decision matrix's arms side by side, its verdict and freshness check, from the last
  jobs.evaluate report.
Plots are embedded, so the file travels alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from pathlib import Path

from tandem.commandline import Job, run
from tandem.config import require, route_config
from tandem.errors import UnknownVersionError
from tandem.freshness import freshness_lines
from tandem.registry import Registry
from tandem.requestlog import read_log
from tandem.stats import percentile

JOB = Job("report", __doc__, ("report", "serve.routes", "serve.request_log", "rollout.decisions_log", "mlflow"),
          shorthands={"route": "report.route", "adapter": "report.adapter"})
COLORS = {"production": "tab:blue", "base": "tab:purple", "canary": "tab:orange", "shadow": "tab:gray",
          "pinned": "tab:green"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def training_plot(registry: Registry, ref: str, plt) -> str:
    try:
        version = registry.resolve(ref)
    except UnknownVersionError:  # RAG first: the route serves the base model until an adapter reaches production
        return f"<p>{html.escape(ref)} does not exist yet: the route answers with the base model and retrieval.</p>"
    curves = {key: sorted(registry.client.get_metric_history(version.run_id, key), key=lambda m: m.step)
              for key in ("loss", "eval_loss")}
    if not any(curves.values()):
        return f"<p>{html.escape(ref)} (version {version.version}) has no training metrics in its run.</p>"
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, history in curves.items():
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=key)
    ax.set(xlabel="step", ylabel="loss", title=f"{version.name}@{version.version}: training")
    ax.legend()
    return _png(fig)


def traffic_plot(requests: list[dict], decisions: list[dict], route: str, bucket_s: float, plt) -> str:
    rows = [r for r in requests if r["route"] == route]
    t0 = min(r["time"] for r in rows)
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for variant in sorted({r["variant"] for r in rows}):
        buckets: dict[int, list[dict]] = {}
        for r in rows:
            if r["variant"] == variant:
                buckets.setdefault(int((r["time"] - t0) // bucket_s), []).append(r)
        xs = sorted(buckets)
        minutes = [x * bucket_s / 60 for x in xs]
        ok = [[r["latency_ms"] for r in buckets[x] if r["status"] == "ok"] for x in xs]
        style = {"color": COLORS.get(variant), "label": variant, "marker": "."}
        axes[0].plot(minutes, [len(buckets[x]) for x in xs], **style)
        axes[1].plot(minutes, [sum(r["status"] != "ok" for r in buckets[x]) / len(buckets[x]) for x in xs], **style)
        axes[2].plot(minutes, [percentile(lat, 0.95) for lat in ok], **style)  # the rollout gate's p95
    for d in decisions:
        if d.get("route") == route and d.get("action") not in (None, "hold"):
            for ax in axes:
                ax.axvline((d["time"] - t0) / 60, color="tab:red" if d["action"] == "rollback" else "tab:green",
                           linestyle="--", linewidth=0.8)
            axes[0].annotate(d["action"], ((d["time"] - t0) / 60, axes[0].get_ylim()[1]), fontsize=7, rotation=90,
                             va="top")
    axes[0].set(ylabel="requests", title=f"route {route}: canary vs production")
    axes[1].set(ylabel="error rate")
    axes[2].set(ylabel="p95 latency (ms)", xlabel="minutes")
    axes[0].legend()
    return _png(fig)


def retrieval_plot(report: dict, plt) -> str:
    metrics = report["metrics"]
    names = ["recall@10", "mrr@10", "ndcg@10"]
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / len(metrics)
    for i, (mode, values) in enumerate(metrics.items()):
        ax.bar([j + i * width for j in range(len(names))], [values.get(n, 0) for n in names], width, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set(ylim=(0, 1), title=f"retrieval: {Path(report['dataset']).name}, {report['queries']} queries")
    ax.legend()
    return _png(fig)


def answers_plot(report: dict, plt) -> str:
    """The decision matrix: each arm's headline metrics side by side."""
    names = ["contains", "valid", "citation_precision", "grounded", "abstained", "retrieved_gold"]
    arms = report["arms"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    width = 0.8 / len(arms)
    for i, (arm, s) in enumerate(arms.items()):
        ax.bar([j + i * width for j in range(len(names))], [s["all"].get(n, {}).get("mean", 0) for n in names], width,
               label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set(ylim=(0, 1), title=f"answers: {report['questions']} {report['split']} questions, k={report['k']}")
    ax.legend(fontsize=7)
    return _png(fig)


def main(argv: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = JOB.config(sys.argv[1:] if argv is None else argv)
    r = cfg.report
    route = require(r.route, "route")
    adapter = route_config(cfg.serve.routes[route]).adapter if route in cfg.serve.routes else None
    registry = Registry.from_config(cfg)
    sections = []
    ref = r.adapter or (f"{adapter}@production" if adapter else None)
    if ref:
        sections.append(("Training", training_plot(registry, ref, plt)))
    requests = read_log(cfg.serve.request_log)
    decisions = read_log(cfg.rollout.decisions_log)
    if any(q["route"] == route for q in requests):
        table = "".join(f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(d['time']))}</td>"
                        f"<td>{html.escape(str(d.get('action')))}</td><td>{html.escape(str(d.get('version', '')))}"
                        f"</td><td>{html.escape('; '.join(d.get('reasons') or [d.get('reason', '')]))}</td></tr>"
                        for d in decisions if d.get("route") == route and d.get("action") != "hold")
        sections.append(("Canary vs production", traffic_plot(requests, decisions, route, r.bucket_s, plt) +
                         f"<table><tr><th>time</th><th>decision</th><th>version</th><th>why</th></tr>{table}</table>"))
    if Path(r.eval).is_file():
        sections.append(("Retrieval", retrieval_plot(json.loads(Path(r.eval).read_text()), plt)))
    if Path(r.evaluate).is_file():
        matrix = json.loads(Path(r.evaluate).read_text())
        lines = matrix["verdict"] + (freshness_lines(matrix["freshness"]) if "freshness" in matrix else [])
        sections.append(("Answer quality", answers_plot(matrix, plt) + "<ul>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"))
    plt.close("all")
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections) or "<p>Nothing to show yet.</p>"
    out = Path(r.output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!doctype html><meta charset='utf-8'><title>Tandem report: {html.escape(route)}</title>"
                   "<style>body{font-family:sans-serif;max-width:820px;margin:2em auto}td,th{padding:2px 8px;"
                   f"text-align:left;font-size:13px}}</style><h1>Tandem: {html.escape(route)}</h1>"
                   f"<p>{time.strftime('%Y-%m-%d %H:%M')}</p>{body}")
    print(f"report written to {out} ({len(sections)} sections)")
    return out


if __name__ == "__main__":
    run(main)
