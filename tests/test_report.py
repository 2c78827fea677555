"""`slmify report` on the demo agent's workspace made through the real stages (collect,
cluster, train with a tiny random base and the real MiniLM label head, eval), opened in
headless Chromium; and the plain progress lines long stages print into a piped log.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, sets
from conftest import run_cli as _cli
from typer.testing import CliRunner

from slmify.cli import app
from slmify.workspace import Workspace


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, demo_trained: Path) -> Path:
    """The demo workspace as `slmify eval` leaves it (a sample of held-out calls)."""
    ws = tmp_path_factory.mktemp("report") / "ws"
    shutil.copytree(demo_trained, ws)
    _cli("eval", "-w", str(ws), "--limit", "80")
    return ws


@pytest.fixture(scope="module")
def report(evaluated: Path) -> dict:
    return _cli("report", "-w", str(evaluated))


def test_the_json_names_the_demo_tasks_readably(report: dict, evaluated: Path) -> None:
    names = {t["id"]: t["name"] for t in report["tasks"]}
    assert len(names) == 4 and len(set(names.values())) == 4
    by_shape = {t["output_shape"]: t for t in report["tasks"]}
    # Each name says what the task does, from its own instruction, not frequent words.
    assert by_shape["label"]["name"] == "Classify the customer's ticket into exactly one label"
    assert by_shape["json"]["name"] == "Extract order details from customer emails for Acme"
    assert by_shape["text"]["name"] == "Write replies to Acme customers"
    assert "lookup_order" in by_shape["tool_call"]["name"]
    assert "a call to lookup_order(order_id)" in by_shape["tool_call"]["description"]
    assert "keys order_id, product, quantity, issue" in by_shape["json"]["description"]
    head = json.loads(
        (evaluated / "specialists" / by_shape["label"]["id"] / "head" / "head.json").read_text()
    )
    assert by_shape["label"]["labels"] == head["labels"] and len(head["labels"]) == 6
    for t in report["tasks"]:
        assert len(t["examples"]) == 3 and all(x["scrubbed"] for x in t["examples"])
        assert all(x["input"] and x["answer"] for x in t["examples"])
    # The headline is eval's, and what stays on the LLM adds up with what was served.
    h = report["headline"]
    summary = json.loads((evaluated / "eval" / "endtoend" / "summary.json").read_text())
    assert h["served"] == summary["served"] and h["calls"] == summary["calls"]
    stays = sum(r["calls"] for r in h["stays_on_llm"])
    assert stays + h["reasons"].get("routed", 0) == h["calls"]
    assert {v["name"] for v in h["by_task"].values()} <= set(names.values())


def test_the_coverage_curve_is_the_calibration_the_threshold_was_fitted_on(report: dict) -> None:
    evaluated = [t["specialist"]["evaluation"] for t in report["tasks"]]
    assert all(evaluated)
    for ev in evaluated:
        d, curve = ev["deferral"], ev["coverage"]
        if not d["calibration_calls"] or not curve:
            continue
        # Thresholds fall, coverage rises to all calls; agreement is of the served ones.
        assert [p[0] for p in curve] == sorted((p[0] for p in curve), reverse=True)
        assert curve[-1][1] == 1.0
        if d["threshold"] == 0:  # too few answers to fit one: no deferral, all served
            assert ev["chosen"] == curve[-1]
        elif d["threshold"] is not None:
            assert round(ev["chosen"][1] * d["calibration_calls"]) == d["calibration_served"]
            assert ev["chosen"][2] == pytest.approx(d["calibration_agreement"], abs=1e-3)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's)")
    return path


def _headless(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run(
        [_chromium(), *flags, *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_the_page_renders_offline_in_chromium(report: dict, tmp_path: Path) -> None:
    page = Path(report["html"])
    html = page.read_text(encoding="utf-8")
    # Self-contained: nothing to fetch (the only URL is SVG's namespace), no script.
    assert not re.search(r"(src|href)=\"https?:", html) and "<script" not in html
    # The detector sees a console error when there is one.
    broken = tmp_path / "broken.html"
    broken.write_text("<script>console.error('boom'); nosuch();</script>", encoding="utf-8")
    assert _console_errors(_headless(broken, tmp_path / "p0", "--dump-dom").stderr)
    run = _headless(page, tmp_path / "p1", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_errors(run.stderr) == []
    dom = run.stdout
    for section in ('id="headline"', 'id="tasks"', 'id="map"'):
        assert section in dom
    assert dom.count('class="card"') == 4
    for t in report["tasks"]:
        assert html_escaped(t["name"]) in dom
    assert report["headline"]["text"] in dom
    assert dom.count("<polyline") >= 4  # learning and coverage curves
    assert dom.count('class="chosen"') == sum(
        1 for t in report["tasks"] if (t["specialist"]["evaluation"] or {}).get("chosen")
    )
    # Screenshot level: the page paints (many colours, not a blank or error page).
    shot = tmp_path / "shot.png"
    run = _headless(page, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1200,2400")
    assert shot.exists(), run.stderr[-2000:]
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def html_escaped(text: str) -> str:
    """As a serialized DOM writes text: quotes as they are."""
    from html import escape

    return escape(text, quote=False)


def test_a_piped_log_shows_plain_progress_lines(
    evaluated: Path, tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(evaluated, ws, ignore=shutil.ignore_patterns("specialists", "eval"))
    monkeypatch.setenv("SLMIFY_PROGRESS_SECONDS", "0")
    tasks = Workspace.at(ws).tasks()
    task = next(t.id for t in tasks if t.output_shape == "text")  # a LoRA: it has steps
    overrides = [
        f"model.base={tiny_base}",
        *TINY_TRAIN,
        "train.max_steps=2",
        "train.logging_steps=1",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["train", "-w", str(ws), "--task", task, *sets(overrides)])
        # The CLI's filter: the libraries' deprecations are silenced, slmify's are not.
        warnings.warn_explicit("theirs", FutureWarning, "x.py", 1, module="transformers.x")
        warnings.warn_explicit("ours", FutureWarning, "y.py", 1, module="slmify.train")
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    assert "ours" in said and "theirs" not in said
    assert not [m for m in said if "deprecated" in m], said
    lines = result.output.splitlines()
    assert f"train {task}: task 1/1 started" in lines
    step = re.compile(rf"train {task}: step 2/2, loss \d+\.\d{{4}}, \d+ tokens/s, 0m00s left$")
    assert any(step.match(line) for line in lines), result.output
    assert f"train {task}: task 1/1 done" in lines
    result = CliRunner().invoke(app, ["eval", "-w", str(ws), "--limit", "5"])
    assert result.exit_code == 0, result.output
    ticks = re.findall(
        r"^eval: (\d+)/(\d+) calls, [\d.]+ calls/s, \d+m\d\ds left$", result.output, re.M
    )
    assert ticks and ticks[-1][0] == ticks[-1][1] and len(ticks) == int(ticks[-1][1])


def test_a_stage_file_from_another_version_is_named(tmp_path: Path) -> None:
    from slmify.schema import TaskCluster

    ws = tmp_path / "ws"
    clustered = Workspace.at(ws)
    clustered.write_tasks(
        [TaskCluster(id="t01-x", label="x", output_shape="text", calls=1, share=1.0)]
    )
    clustered.write_assignments({"c1": "t01-x"})
    summary = clustered.end_to_end_file()
    summary.parent.mkdir(parents=True)
    summary.write_text('{"split": "test"}')
    result = CliRunner().invoke(app, ["report", "-w", str(ws)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: {summary}: not a EndToEnd (sessions: Field required, 14 errors)"
    )
