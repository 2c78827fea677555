"""The `slmify report` page: the document slmify.workspace_report builds, as one HTML file
that works offline (inline CSS and SVG, no script, nothing fetched).

Sections: the headline (`#headline`), one card per task (`#tasks`: what it is, examples,
its specialist's learning curve, agreement, coverage/agreement curve and latency), and the
map of the calls with the tasks named (`#map`). Reads and writes nothing itself.
"""

from __future__ import annotations

from html import escape
from typing import Any

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} .muted{color:#777;font-size:13px}
.figures{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0}
.figure{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:170px}
.figure b{display:block;font-size:24px} .figure span{font-size:13px;color:#555}
.card{border:1px solid #ddd;border-radius:6px;padding:1em 1.2em;margin:1.2em 0}
.card h3{margin:.1em 0} .charts{display:flex;flex-wrap:wrap;gap:1.5em;margin-top:.8em}
.chip{display:inline-block;background:#eef;border-radius:9px;padding:1px 8px;margin:2px;
font-size:12px}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 7px;
font-size:13px;vertical-align:top;text-align:left} th{background:#f4f4f4}
pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:480px}
.promoted{color:#2a7a2a;font-weight:bold} .llm{color:#a55;font-weight:bold}
svg text{font-size:10px;fill:#444}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_page(doc: dict[str, Any]) -> str:
    colors = {t["id"]: PALETTE[n % len(PALETTE)] for n, t in enumerate(doc["tasks"])}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slmify report</title>
<style>{CSS}</style></head><body>
<h1>What converting this agent buys</h1>
<p class="muted">Workspace {_e(doc["workspace"])} · {_e(doc["created_at"])}</p>
{headline_section(doc["headline"])}
<section id="tasks"><h2>Tasks</h2>
<p class="muted">Each recurring kind of call the agent makes, named from its own calls; the
id in grey is what files and the manifest use.</p>
{"".join(task_card(t, colors[t["id"]]) for t in doc["tasks"])}
</section>
{map_section(doc["map"], doc["tasks"], colors)}
</body></html>
"""


def headline_section(h: dict[str, Any] | None) -> str:
    if h is None:
        return (
            '<section id="headline"><h2>Headline</h2><p>No end-to-end figures yet: run '
            "<code>slmify eval</code>.</p></section>"
        )
    cost = h["llm_cost_usd_moved"]
    latency = h["llm_latency_s_moved"]
    figures = [
        (_pct(h["served_share"]), f"of {h['calls']} held-out calls answered by specialists"),
        (
            _num(h["agreement"]),
            f"agreement with the LLM (lower bound {_num(h['agreement_lower'])}, "
            f"{h['confidence']:.0%} confidence)",
        ),
        (
            _pct(h["served_without_deferral"] / h["calls"] if h["calls"] else None),
            f"served without deferral, agreement {_num(h['agreement_without_deferral'])} "
            f"(lower {_num(h['agreement_lower_without_deferral'])})",
        ),
        ("n/a" if cost is None else f"${cost:.4f}", "LLM cost moved off the LLM"),
        ("n/a" if latency is None else f"{latency:.1f} s", "LLM latency moved (recorded)"),
    ]
    boxes = "".join(
        f'<div class="figure"><b>{_e(v)}</b><span>{_e(s)}</span></div>' for v, s in figures
    )
    stays = "".join(
        f"<tr><td>{_e(r['reason'])}</td><td>{r['calls']}</td><td>{_e(r['meaning'])}</td></tr>"
        for r in h["stays_on_llm"]
    )
    return f"""<section id="headline"><h2>Headline</h2>
<p>{_e(h["text"])}, replaying {h["sessions"]} held-out sessions through the deployment as
<code>slmify serve</code> runs it.</p><div class="figures">{boxes}</div>
<h3>What stays on the LLM, and why</h3>
<table><tr><th>reason</th><th>calls</th><th>meaning</th></tr>{stays}</table></section>"""


def task_card(t: dict[str, Any], color: str) -> str:
    labels = "".join(f'<span class="chip">{_e(x)}</span>' for x in t["labels"] or [])
    examples = "".join(
        f"<tr><td><pre>{_e(x['input'])}</pre></td><td><pre>{_e(x['answer'])}</pre></td>"
        f"<td>{'yes' if x['scrubbed'] else 'no (not curated)'}</td></tr>"
        for x in t["examples"]
    )
    return f"""<div class="card" id="task-{_e(t["id"])}">
<h3><span style="color:{color}">■</span> {_e(t["name"])}</h3>
<p class="muted">{_e(t["id"])} · {_e(t["output_shape"])}</p>
<p>{_e(t["description"])}</p>
<p>{t["calls"]} calls ({t["share"]:.1%} of all), LLM cost ${t["llm_cost_usd"]:.4f},
{t["input_tokens"]} input and {t["output_tokens"]} output tokens.</p>
{f"<p>Labels: {labels}</p>" if labels else ""}
<table><tr><th>the agent asked (excerpt)</th><th>the LLM answered</th><th>scrubbed</th></tr>
{examples}</table>
{specialist_block(t["specialist"])}</div>"""


def specialist_block(s: dict[str, Any]) -> str:
    if s["status"] != "trained":
        return f"<p><b>Specialist:</b> {_e(s['status'])}: {_e(s['reason'])}</p>"
    trained = (
        f"<b>Specialist:</b> {_e(s['kind'])} on {_e(s['base_model'] or 'sentence embeddings')}"
    )
    if s.get("stopped"):
        trained += f", stopped: {_e(s['stopped'])}"
    charts = [learning_chart(s)]
    ev = s["evaluation"]
    if ev is None:
        return f"<p>{trained}. Not evaluated yet: run <code>slmify eval</code>.</p>" + charts[0]
    d, a, served = ev["decision"], ev["agreement"], ev["served"]
    status = "promoted" if d["status"] == "promoted" else "stays on the LLM"
    verdict = f'<span class="{d["status"]}">{status}</span>: {_e(d["reason"])}'
    line = ""
    if served:
        line = (
            f"On the held-out sessions the router sent it {served['routed']} calls; it "
            f"answered {served['served']} (agreement {_num(served['agreement'])}, lower "
            f"bound {_num(served['agreement_lower'])}); without deferral it would have "
            f"answered {served['served_without_deferral']} (agreement "
            f"{_num(served['agreement_without_deferral'])})."
        )
    charts += [agreement_chart(a, d.get("threshold")), coverage_chart(ev), latency_chart(ev)]
    return f"""<p>{trained}.</p><p>{verdict}</p><p>{_e(line)}</p>
<div class="charts">{"".join(charts)}</div>"""


def _chart(title: str, body: str, w: int = 300, h: int = 190) -> str:
    return (
        f'<figure style="margin:0"><svg role="img" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
        f'{body}</svg><figcaption class="muted">{_e(title)}</figcaption></figure>'
    )


def _scale(lo: float, hi: float, a: float, b: float):  # noqa: ANN202
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def line_plot(
    series: list[tuple[str, list[list[float]], str]], x_name: str, y_name: str, bounds=None
) -> tuple[str, Any, Any]:  # noqa: ANN001
    """Polylines on shared axes; returns the SVG and the x and y scales for marks."""
    xs = [p[0] for _, pts, _ in series for p in pts]
    ys = [p[1] for _, pts, _ in series for p in pts]
    x0, x1, y0, y1 = bounds or (min(xs), max(xs), min(ys), max(ys))
    sx, sy = _scale(x0, x1, 40, 290), _scale(y0, y1, 160, 12)
    out = [
        '<line x1="40" y1="160" x2="290" y2="160" stroke="#999"/>',
        '<line x1="40" y1="12" x2="40" y2="160" stroke="#999"/>',
        f'<text x="40" y="174">{x0:g}</text><text x="290" y="174" text-anchor="end">{x1:g}</text>',
        f'<text x="165" y="186" text-anchor="middle">{_e(x_name)}</text>',
        f'<text x="36" y="160" text-anchor="end">{y0:.4g}</text>',
        f'<text x="36" y="18" text-anchor="end">{y1:.4g}</text>',
        f'<text x="4" y="90" transform="rotate(-90 8 90)">{_e(y_name)}</text>',
    ]
    for n, (name, pts, color) in enumerate(series):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>' for x, y in pts]
        out.append(
            f'<text x="285" y="{24 + 12 * n}" text-anchor="end" fill="{color}">{_e(name)}</text>'
        )
    return "".join(out), sx, sy


def learning_chart(s: dict[str, Any]) -> str:
    curve = s.get("curve") or {}
    series = [
        (name, pts, color)
        for name, pts, color in (
            ("train loss", curve.get("train") or [], "#1f77b4"),
            ("validation loss", curve.get("validation") or [], "#ff7f0e"),
        )
        if pts
    ]
    if not series:
        acc = s.get("cv_accuracy")
        what = f"cross-validated accuracy {_num(acc)}" if acc is not None else "no curve recorded"
        return f'<p class="muted">Learning curve: none for a {_e(s["kind"])} ({what}).</p>'
    body, _, _ = line_plot(series, "step", "loss")
    return _chart("Learning curve (loss by step; step 0 is the base model)", body)


def agreement_chart(a: dict[str, Any], target: float | None) -> str:
    sx = _scale(0.0, 1.0, 20, 280)
    body = [
        '<rect x="20" y="40" width="260" height="24" fill="#eee"/>',
        f'<rect x="{sx(a["lower"]):.1f}" y="40" width="{sx(a["upper"]) - sx(a["lower"]):.1f}" '
        'height="24" fill="#9ecae1"/>',
        f'<line x1="{sx(a["mean"]):.1f}" y1="34" x2="{sx(a["mean"]):.1f}" y2="70" '
        'stroke="#08519c" stroke-width="3"/>',
        '<text x="20" y="84">0</text><text x="280" y="84" text-anchor="end">1</text>',
        f'<text x="20" y="110">agreement {a["mean"]:.3f} over {a["n"]} answers</text>',
        f'<text x="20" y="124">bound [{a["lower"]:.3f}, {a["upper"]:.3f}]</text>',
    ]
    if target is not None:
        body.append(
            f'<line x1="{sx(target):.1f}" y1="30" x2="{sx(target):.1f}" y2="74" '
            'stroke="#d62728" stroke-dasharray="3,2"/>'
            f'<text x="20" y="138" fill="#d62728">gate: lower bound ≥ {target:.2f}</text>'
        )
    return _chart("Agreement with the LLM on routed test calls", "".join(body), h=150)


def coverage_chart(ev: dict[str, Any]) -> str:
    curve, chosen, d = ev["coverage"], ev["chosen"], ev["deferral"] or {}
    if not curve:
        return '<p class="muted">Coverage curve: no calibration answers routed to it.</p>'
    pts = [[c, a] for _, c, a in curve]
    body, sx, sy = line_plot(
        [("agreement", pts, "#2ca02c")], "share served", "agreement", (0, 1, 0, 1)
    )
    if d.get("target") is not None:
        y = sy(d["target"])
        body += (
            f'<line x1="40" y1="{y:.1f}" x2="290" y2="{y:.1f}" stroke="#d62728" '
            'stroke-dasharray="3,2"/>'
        )
    if chosen and chosen[2] is not None:
        body += (
            f'<circle class="chosen" cx="{sx(chosen[1]):.1f}" cy="{sy(chosen[2]):.1f}" r="5" '
            'fill="none" stroke="#d62728" stroke-width="2"/>'
            f'<text x="45" y="150">threshold {chosen[0]:.3f}: serves {chosen[1]:.0%}</text>'
        )
    else:
        body += '<text x="45" y="150">no threshold reaches the target</text>'
    title = "Confidence threshold: share served vs agreement (calibration); circle = chosen"
    return _chart(title, body)


def latency_chart(ev: dict[str, Any]) -> str:
    ours, llm = ev["latency_ms_p50"], ev["llm_latency_ms_p50"]
    known = [
        (n, v, c) for n, v, c in (("specialist", ours, "#2ca02c"), ("LLM", llm, "#7f7f7f")) if v
    ]
    if not known:
        return '<p class="muted">Latency: not recorded.</p>'
    top = max(v for _, v, _ in known)
    bars = "".join(
        f'<rect x="80" y="{20 + 30 * n}" width="{max(1.0, 150 * v / top):.1f}" height="20" '
        f'fill="{c}"/><text x="74" y="{34 + 30 * n}" text-anchor="end">{name}</text>'
        f'<text x="{84 + 150 * v / top:.1f}" y="{34 + 30 * n}">{v:.0f} ms</text>'
        for n, (name, v, c) in enumerate(known)
    )
    return _chart("Median latency per call", bars, h=90)


def map_section(m: dict[str, Any] | None, tasks: list[dict[str, Any]], colors: dict) -> str:  # noqa: ANN001
    if not m or not m.get("points"):
        return (
            '<section id="map"><h2>Map of the calls</h2><p>No map: run '
            "<code>slmify cluster</code> again to record it.</p></section>"
        )
    xs, ys = [p[0] for p in m["points"]], [p[1] for p in m["points"]]
    sx, sy = _scale(min(xs), max(xs), 10, 590), _scale(min(ys), max(ys), 410, 10)
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colors.get(t, "#bbb")}"/>'
        for (x, y), t in zip(m["points"], m["task"], strict=True)
    )
    legend = "".join(
        f'<rect x="610" y="{14 + 18 * n}" width="10" height="10" fill="{colors[t["id"]]}"/>'
        f'<text x="626" y="{23 + 18 * n}" style="font-size:11px">{_e(t["name"])}</text>'
        for n, t in enumerate(tasks)
    )
    legend += (
        f'<rect x="610" y="{14 + 18 * len(tasks)}" width="10" height="10" fill="#bbb"/>'
        f'<text x="626" y="{23 + 18 * len(tasks)}" style="font-size:11px">no task (LLM)</text>'
    )
    svg = (
        f'<svg role="img" width="960" height="420" viewBox="0 0 960 420" '
        f'xmlns="http://www.w3.org/2000/svg"><title>calls by task</title>{dots}{legend}</svg>'
    )
    return f"""<section id="map"><h2>Map of the calls</h2>
<p class="muted">t-SNE of a sample of {len(xs)} calls' clustering features, coloured by task.</p>
{svg}</section>"""
