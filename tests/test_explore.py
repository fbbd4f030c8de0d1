"""`vitlens explore`: the HTTP API (token, parameters, read-only), the data it serves against
DuckDB queries of the same rows, and the page in a real headless Chromium (block slider,
hover, a table row to its image, no console errors).

One small job per tier (a zoo model and its random twin, 20 shapes images, `baseline` and
`heads`; and a summary-tier set), analysed by `ShardProcessor` (no Ray), one server per tier.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import pytest

from tests.test_report_browser import DevTools, _console_errors, find_chromium
from vitlens.cli import main as cli_main
from vitlens.explore.data import ExploreData
from vitlens.explore.server import Explorer
from vitlens.runner.bookkeeping import JobReport, write_run_record
from vitlens.runner.shard_job import ShardProcessor
from vitlens.runner.spec import DataSpec, ExplainSpec, JobSpec

VARIANT, TWIN = "shapes_vit_p16", "shapes_vit_p16@random"
STEM = "shapes-validation-000000"
DEPTH = 6

#: The stored top-5 columns of `tokens` (schema >= 8: one column per rank) as the view's lists.
TOP5 = ", ".join("[" + ", ".join(f"{name}_{rank}" for rank in range(1, 6)) + "]" for name in ("top5_class", "top5_logit"))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def result_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explore")
    assert cli_main(["shards", "shapes", "--classes", "20", "--per-class", "1", "--size", "64", "--shard-size", "20",
                     "--seed", "0", "--split", "validation", "--out", str(root / "shards")]) == 0
    out = {}
    for detail, experiments in (("tokens", ("baseline", "heads", "explain")), ("summary", ("baseline",))):
        job = JobSpec(name=f"explore-{detail}", output=str(root / detail), variants=(VARIANT, TWIN),
                      data=DataSpec(manifest=str(root / "shards" / "manifest.json")), experiments=experiments,
                      batch_size=20, detail=detail, explain=ExplainSpec(curve_points=2, random_orders=1))
        stats = [ShardProcessor(variant, job).process(str(root / "shards" / f"{STEM}.tar"), STEM)
                 for variant in job.variants]
        # the runs row a job writes: the explorer finds the shards (for the pictures) through it
        write_run_record(job, JobReport(shards_total=2, shards_skipped=0, shards_done=2, shard_stats=stats,
                                        run_id=f"explore-{detail}"), "done")
        out[detail] = root / detail
    return out


class Running:
    """An explorer served from a thread."""

    def __init__(self, results: Path) -> None:
        self.data = ExploreData(results)
        self.app = Explorer(self.data)
        self.server = self.app.serve("127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def get(self, path: str, token: str | None = "", headers: dict | None = None) -> tuple[int, bytes, dict]:
        headers = dict(headers or {})
        if token == "":
            headers["X-Vitlens-Token"] = self.app.token
        elif token is not None:
            headers["X-Vitlens-Token"] = token
        request = urllib.request.Request(self.base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def json(self, path: str) -> object:
        status, body, _ = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.data.close()


@pytest.fixture(scope="module")
def explorer(result_sets):
    before = _snapshot(result_sets["tokens"])
    running = Running(result_sets["tokens"])
    yield running
    running.close()
    assert _snapshot(result_sets["tokens"]) == before  # the server never wrote into the result folder


def _key(result_sets) -> str:
    return duckdb.connect().execute(
        f"SELECT min(image_key) FROM read_parquet('{result_sets['tokens']}/table=images/variant={VARIANT}/"
        "experiment=baseline/*.parquet')").fetchone()[0]


def test_the_token_is_required(explorer) -> None:
    for path in ("/", "/api/variants", "/app.js", "/api/picture?variant=x&key=y"):
        assert explorer.get(path, token=None)[0] == 403
        assert explorer.get(path, token="wrong")[0] == 403
    status, body, headers = explorer.get(f"/?token={explorer.app.token}", token=None)
    assert status == 200 and b"vitlens explore" in body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert explorer.get("/api/variants", token=None, headers={"Cookie": cookie})[0] == 200


def test_hostile_parameters_are_data_not_code(explorer, result_sets) -> None:
    key = _key(result_sets)
    for hostile in ("x' OR '1'='1", "../../etc/passwd", "'; DROP TABLE images; --", "a\"b"):
        quoted = urllib.request.quote(hostile)
        status, body, _ = explorer.get(f"/api/tokens?variant={VARIANT}&key={quoted}&block=1")
        assert status == 404 and "is not in the images" in json.loads(body)["error"]
        status, _, _ = explorer.get(f"/api/images?variant={quoted}")
        assert status == 404
    assert explorer.get(f"/api/images?variant={VARIANT}&sort=image_key;DROP")[0] == 400
    assert explorer.get(f"/api/tokens?variant={VARIANT}&key={key}&block=one")[0] == 400
    for path in ("/../../etc/passwd", "/static/../server.py", "/app.js/../../data.py", "/index.html"):
        assert explorer.get(path)[0] == 404
    assert explorer.json(f"/api/images?variant={VARIANT}")["total"] == 20  # nothing was dropped


def test_tokens_and_images_are_the_stored_rows(explorer, result_sets) -> None:
    key = _key(result_sets)
    served = explorer.json(f"/api/tokens?variant={VARIANT}&key={key}&block=3&stream=attn")
    rows = duckdb.connect().execute(
        f"SELECT token, identifiability_rank, {TOP5} FROM read_parquet("
        f"'{result_sets['tokens']}/table=tokens/variant={VARIANT}/experiment=baseline/*.parquet') "
        "WHERE image_key = ? AND block = 3 AND stream = 'attn' ORDER BY token", [key]).fetchall()
    assert [t["token"] for t in served["tokens"]] == [r[0] for r in rows]
    for token, (_, rank, classes, logits) in zip(served["tokens"], rows):
        assert token["rank"] == rank and [c["class"] for c in token["top5"]] == list(classes)
        assert [c["logit"] for c in token["top5"]] == pytest.approx(list(logits), abs=1e-3)
    page = explorer.json(f"/api/images?variant={VARIANT}&correct=false&sort=last_block_id_pct&desc=true&limit=5")
    expected = duckdb.connect().execute(
        f"SELECT count(*) FROM read_parquet('{result_sets['tokens']}/table=images/variant={VARIANT}/"
        "experiment=baseline/*.parquet') WHERE NOT correct").fetchone()[0]
    assert page["total"] == expected and all(not row["correct"] for row in page["images"])
    rates = [row["last_block_id_pct"] for row in page["images"]]
    assert rates == sorted(rates, reverse=True)
    # the curves of two images and of the whole set, against the tokens rows
    other = explorer.json(f"/api/images?variant={VARIANT}&sort=image_key&desc=true&limit=1")["images"][0]["image_key"]
    assert other != key
    curves = explorer.json(f"/api/curves?variant={VARIANT}&keys={key},{other}")[VARIANT]
    tokens = f"read_parquet('{result_sets['tokens']}/table=tokens/variant={VARIANT}/experiment=baseline/*.parquet')"
    rate = ("SELECT block, token_kind::VARCHAR, 100.0 * avg((identifiability_rank = 0)::INT) FROM " + tokens +
            " WHERE stream = 'resid' AND token_kind IN ('cls', 'image') {} GROUP BY ALL ORDER BY ALL")
    chosen = duckdb.connect().execute(rate.format("AND image_key IN (?, ?)"), [key, other]).fetchall()
    whole = duckdb.connect().execute(rate.format("")).fetchall()
    for got, expected in ((curves["chosen"], chosen), (curves["set"], whole)):
        assert [(b, k) for b, k, _ in got] == [(b, k) for b, k, _ in expected]
        assert [v for *_, v in got] == pytest.approx([v for *_, v in expected])
    heads = explorer.json(f"/api/heads?variant={VARIANT}&key={key}")
    assert heads["token_kind"] == "cls" and {c["block"] for c in heads["cells"]} == set(range(1, DEPTH + 1))
    status, body, headers = explorer.get(f"/api/picture?variant={VARIANT}&key={key}")
    assert status == 200 and headers["Content-Type"] == "image/png" and body[:4] == b"\x89PNG"
    assert explorer.get("/api/variants", headers={"Content-Type": "x"})[0] == 200
    request = urllib.request.Request(explorer.base + "/api/variants", data=b"{}", method="POST",
                                     headers={"X-Vitlens-Token": explorer.app.token})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405


def test_a_summary_tier_set_shows_what_it_can(result_sets) -> None:
    running = Running(result_sets["summary"])
    try:
        variants = running.json("/api/variants")
        assert {v["name"]: v["has_tokens"] for v in variants} == {VARIANT: False, TWIN: False}
        assert [v["twin"] for v in variants if v["name"] == VARIANT] == [TWIN]
        curves = running.json(f"/api/curves?variant={VARIANT}&keys={_key(result_sets)}")
        assert set(curves) == {VARIANT, TWIN} and curves[VARIANT]["set"] and curves[VARIANT]["chosen"]
        status, body, _ = running.get(f"/api/tokens?variant={VARIANT}&key={_key(result_sets)}&block=1")
        assert status == 400 and 'detail = \\"tokens\\"' in body.decode()
        assert running.json(f"/api/images?variant={VARIANT}")["total"] == 20
    finally:
        running.close()


# ---- the page in a real browser ----------------------------------------------------------------
def _wait_ready(browser: DevTools, session: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = _evaluate(browser, session, "document.body.dataset.ready === 'true' && "
                                            "document.getElementById('status').textContent === ''")
        if value:
            return
        time.sleep(0.1)
    raise AssertionError("the page did not finish: " + str(_evaluate(browser, session,
                                                                   "document.getElementById('status').textContent")))


def _evaluate(browser: DevTools, session: str, expression: str) -> object:
    result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True}, session=session)
    if "exceptionDetails" in result:
        raise AssertionError(result["exceptionDetails"])
    return result["result"].get("value")


def test_the_page_in_chromium(explorer, result_sets, tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        import os

        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but no Chromium is installed (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH")
    key = _key(result_sets)
    browser = DevTools(binary, tmp_path / "profile")
    try:
        target = next(t["targetId"] for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        url = f"{explorer.base}/?token={explorer.app.token}#view=image&variant={VARIANT}&key={key}&block=2&stream=resid"
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for_event("Page.loadEventFired", session)
        _wait_ready(browser, session)
        assert _evaluate(browser, session, "document.querySelectorAll('#panels canvas').length") == 2  # and the twin
        # the block slider: to the last block
        _evaluate(browser, session, f"(() => {{ const s = document.getElementById('block'); s.value = {DEPTH}; "
                                    "s.dispatchEvent(new Event('input')); })()")
        time.sleep(0.2)
        _wait_ready(browser, session)
        assert f"block={DEPTH}" in _evaluate(browser, session, "location.hash")
        # explain: a map per block, and the heads' maps of the slider's block
        heads = len({c["head"] for c in explorer.json(f"/api/heads?variant={VARIANT}&key={key}")["cells"]})
        assert _evaluate(browser, session, "document.querySelectorAll('#explain canvas').length") == DEPTH + heads
        assert _evaluate(browser, session, "document.querySelectorAll('#heads td').length") > DEPTH * 2
        # hover the image token in grid row 1, column 2 (position 1 + 1 * 4 + 2 = 7) of the first panel
        box = _evaluate(browser, session, "(() => { const r = document.querySelector('#panels canvas')"
                                          ".getBoundingClientRect(); return [r.left, r.top, r.width / 4]; })()")
        x, y = box[0] + 2.5 * box[2], box[1] + 1.5 * box[2]
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, session=session)
        time.sleep(0.2)
        shown = _evaluate(browser, session, "(() => { const t = document.getElementById('tooltip'); return "
                                            "{hidden: t.hidden, token: t.dataset.token, names: Array.from("
                                            "t.querySelectorAll('table.top5 tr')).map(r => r.cells[1].textContent),"
                                            " logits: Array.from(t.querySelectorAll('table.top5 tr'))"
                                            ".map(r => Number(r.cells[2].textContent))}; })()")
        assert shown["hidden"] is False and shown["token"] == "7"
        classes, logits = duckdb.connect().execute(
            f"SELECT {TOP5} FROM read_parquet('{result_sets['tokens']}/table=tokens/"
            f"variant={VARIANT}/experiment=baseline/*.parquet') WHERE image_key = ? AND block = {DEPTH} "
            "AND stream = 'resid' AND token = 7", [key]).fetchone()
        names = explorer.json("/api/variants")[0]["class_names"]
        assert shown["names"] == [names[c] for c in classes]
        assert shown["logits"] == pytest.approx(list(logits), abs=1e-3)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (tmp_path / "explore.png").write_bytes(__import__("base64").b64decode(shot["data"]))
        # a table row to its image
        _evaluate(browser, session, f"location.hash = 'view=images&variant={VARIANT}&sort=image_key&desc=true'")
        time.sleep(0.2)
        _wait_ready(browser, session)
        first = _evaluate(browser, session, "document.querySelector('#image-table tbody tr').dataset.key")
        _evaluate(browser, session, "document.querySelector('#image-table tbody tr').click()")
        time.sleep(0.2)
        _wait_ready(browser, session)
        state = _evaluate(browser, session, "location.hash")
        assert "view=image" in state and f"key={first}" in state
        assert _evaluate(browser, session, "document.getElementById('image-title').textContent").startswith(first)
        time.sleep(0.3)
        _evaluate(browser, session, "1")
        assert _console_errors(browser.events) == []
    finally:
        browser.close()


def test_the_command_prints_a_url_with_its_token_and_stops_cleanly(result_sets, tmp_path: Path) -> None:
    """`vitlens explore` as a user runs it: one line with the URL, the API behind it, Ctrl-C
    (SIGINT) stops it with exit 0; a folder without results is a one-line error, exit 2."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, HOME=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "vitlens", "explore", "--results",
                                str(result_sets["summary"]), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        url = lines[1].split("open ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        base, token = url.split("/?token=")
        request = urllib.request.Request(base + "/api/variants", headers={"X-Vitlens-Token": token})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert {v["name"] for v in json.loads(response.read())} == {VARIANT, TWIN}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "vitlens", "explore", "--results", str(empty), "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_images_sort_by_their_explain_auc(explorer, result_sets) -> None:
    """The per-image negative deletion AUC of method ours: the trapezoid of `correct` over
    `kept_fraction`, recomputed here in numpy from the stored curves."""
    import numpy as np

    rows = duckdb.connect().execute(
        f"SELECT image_key, kept_fraction, correct::INT FROM read_parquet('{result_sets['tokens']}/"
        f"table=perturbation_curves/variant={VARIANT}/experiment=explain/*.parquet') "
        "WHERE method = 'ours' AND test = 'negative' ORDER BY image_key, kept_tokens").fetchall()
    expected: dict[str, float] = {}
    for key in {r[0] for r in rows}:
        x, y = (np.array([r[i] for r in rows if r[0] == key], dtype=float) for i in (1, 2))
        expected[key] = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    page = explorer.json(f"/api/images?variant={VARIANT}&sort=ours_negative_auc&desc=true&limit=100")
    got = {row["image_key"]: row["ours_negative_auc"] for row in page["images"]}
    assert got.keys() == expected.keys() and all(abs(got[k] - expected[k]) < 1e-9 for k in got)
    values = [row["ours_negative_auc"] for row in page["images"]]
    assert values == sorted(values, reverse=True)
