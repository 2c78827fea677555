"""The cluster report a person looks at: an HTML page and the same content as JSON.

Writes, into the folder the cluster stage stages its files in, `report.html` (the task
table ranked by value, and a 2-D map of the calls coloured by task, unassigned calls in
grey: t-SNE of a sample of the clustering features, drawn with matplotlib's Agg backend, a
PNG embedded in the page), `report.json` (`ClusterReport`: the run summary and the task
list) and `map.json` (`CallMap`: the map's points and each point's task, which `slmify
report` draws with the tasks named), the last two through slmify.workspace's writers.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from slmify.schema import TaskCluster
from slmify.schema_stages import CallMap, ClusterSummary
from slmify.workspace import cluster_page_file, write_call_map, write_cluster_report

MAX_POINTS = 2000  # t-SNE on a sample: seconds, and the picture is as readable


def map_png(points: np.ndarray, task_of: list[str | None], tasks: list[TaskCluster]) -> bytes:
    """A scatter of the calls in 2-D, one colour per task (largest tasks in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    labels = np.array([t or "" for t in task_of])
    lost = labels == ""
    ax.scatter(points[lost, 0], points[lost, 1], s=4, c="#bbbbbb", label="unassigned (LLM)")
    cmap = plt.get_cmap("tab20")
    for n, task in enumerate(sorted(tasks, key=lambda t: -t.calls)):
        mine = labels == task.id
        ax.scatter(
            points[mine, 0],
            points[mine, 1],
            s=5,
            color=cmap(n % 20),
            label=task.id if n < 20 else None,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Calls by task (t-SNE of the clustering features, a sample)")
    ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_html(summary: ClusterSummary, tasks: list[TaskCluster], png: bytes) -> str:
    cols = [
        "rank",
        "id",
        "label",
        "calls",
        "share",
        "shape",
        "input tok",
        "output tok",
        "LLM cost $",
        "output diversity",
        "value",
        "representatives",
    ]
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                n,
                t.id,
                t.label,
                t.calls,
                f"{t.share:.1%}",
                t.output_shape,
                t.input_tokens,
                t.output_tokens,
                f"{t.llm_cost_usd:.2f}",
                f"{t.output_diversity:.2f}",
                f"{t.value_score:.2f}",
                ", ".join(t.representatives[:3]),
            )
        )
        + "</tr>"
        for n, t in enumerate(tasks, 1)
    )
    facts = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(json.dumps(v, default=str))}</li>"
        for k, v in summary.model_dump(mode="json").items()
    )
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slmify cluster report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}} th{{background:#eee}}</style>
</head><body>
<h1>Task types of the agent</h1>
<p>Ranked by value: the LLM cost a task represents, weighted by how readily a small
model learns its output shape and how alike its outputs are.</p>
<table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{rows}</table>
<h2>Map of the calls</h2><img alt="calls by task" src="data:image/png;base64,{image}">
<h2>Run</h2><ul>{facts}</ul>
</body></html>
"""


def map_points(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a sample of calls and their 2-D t-SNE coordinates."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features), min(len(features), MAX_POINTS), replace=False))
    perplexity = float(min(30, max(2, len(rows) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return rows, tsne.fit_transform(features[rows])


def write_report(
    folder: Path,
    summary: ClusterSummary,
    tasks: list[TaskCluster],
    features: np.ndarray,
    task_of: list[str | None],
) -> None:
    """report.html, report.json and map.json into `folder` (a staging folder: the caller
    renames)."""
    rows, points = map_points(features)
    png = map_png(points, [task_of[i] for i in rows], tasks)
    cluster_page_file(folder).write_text(render_html(summary, tasks, png), encoding="utf-8")
    spots = CallMap(points=np.round(points, 2).tolist(), task=[task_of[i] for i in rows])
    write_call_map(folder, spots)
    write_cluster_report(folder, summary, tasks)
