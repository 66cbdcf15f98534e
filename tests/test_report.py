"""`owngpt report`: every section with the run's real numbers (read back from the HTML), a page that loads nothing
from the network and logs no error in headless Chromium, two runs side by side, classify and chat sections, and a
report failure that never fails the run."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_helpers import quick_cfg, write_chat_data_dir

import fixtures
import owngpt
import owngpt.report
from owngpt.cli import main
from owngpt.train import train

SECTIONS = ("environment", "data", "config", "curves", "metrics", "speed", "checkpoints", "model")


class Cells(HTMLParser):
    """data-key -> {run: data-value} of every cell, the section ids, image sources, <pre> texts."""

    def __init__(self):
        super().__init__()
        self.cells: dict[str, dict[int, str]] = {}
        self.sections: list[str] = []
        self.images: list[str] = []
        self.pres: list[str] = []
        self._pre: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-key" in a and "data-value" in a:
            self.cells.setdefault(a["data-key"], {})[int(a.get("data-run", 0))] = a["data-value"]
        if tag == "section":
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "pre":
            self._pre = []

    def handle_data(self, data):
        if self._pre is not None:
            self._pre.append(data)

    def handle_endtag(self, tag):
        if tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None


def parse(path: Path) -> Cells:
    p = Cells()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def num(cells: Cells, key: str, run: int = 0) -> float:
    return float(cells.cells[key][run])


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny lm run whose report was written by train() itself (the hook), with samples."""
    import os

    d = tmp_path_factory.mktemp("report")
    data = fixtures.write_lm_data_dir(d / "data")
    old = os.environ.pop("OWNGPT_NO_REPORT", None)
    try:
        res = train(quick_cfg(data, d / "run", "tiny", block_size=32))
    finally:
        if old is not None:
            os.environ["OWNGPT_NO_REPORT"] = old
    return res.run_dir, data


def test_the_report_at_the_end_of_training_holds_every_section_with_the_runs_numbers(lm_run):
    run, data = lm_run
    page = run / "report.html"
    assert page.exists() and (run / "report.md").exists()
    c = parse(page)
    assert tuple(c.sections) == SECTIONS
    h = history(run)
    evals = [r for r in h if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert num(c, "best.val_loss") == pytest.approx(best["val_loss"], rel=1e-12)
    assert num(c, "metrics.best_step") == best["step"]
    assert num(c, "final.val_loss") == pytest.approx(evals[-1]["val_loss"], rel=1e-12)
    assert num(c, "final.train_loss") == pytest.approx([r for r in h if "train_loss" in r][-1]["train_loss"])
    assert num(c, "speed.steps") == 6
    rates = sorted(r["tokens_per_s"] for r in h if "tokens_per_s" in r)
    assert num(c, "speed.tokens_per_s") == pytest.approx(float(np.median(rates)))
    import torch

    from owngpt.checkpoint import load_model

    assert num(c, "speed.params") == sum(p.numel() for p in load_model(run / "checkpoints" / "best").parameters())
    for name in ("best", "last"):
        size = sum(f.stat().st_size for f in (run / "checkpoints" / name).rglob("*") if f.is_file())
        assert num(c, f"checkpoint.{name}") == size
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert num(c, "config.lr") == cfg["lr"] and c.cells["config.model"][0] == "tiny"
    meta = json.loads((data / "meta.json").read_text())
    assert num(c, "data.split_train") == meta["splits"]["train"]["documents"]
    assert num(c, "data.vocab") == meta["tokenizer"]["vocab_size"]
    assert c.cells["env.torch"][0] == torch.__version__
    assert c.cells["env.owngpt"][0] == owngpt.__version__
    # images are inline PNGs; the loss curve is one of them
    assert len(c.images) >= 2 and all(src.startswith("data:image/png;base64,") for src in c.images)
    # the samples are what the public API generates with the settings the page states (an unconditional one last)
    m = owngpt.load(str(run / "checkpoints" / "best"))
    n_prompts = len(c.pres)
    assert n_prompts >= 2
    unconditional = m.generate("", temperature=0.8, top_k=50, max_new_tokens=200, seed=n_prompts - 1)
    assert c.pres[-1] == unconditional
    md = (run / "report.md").read_text()
    assert f"{best['val_loss']:.4f}" in md and "![" in md
    for img in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (run / img).exists()


def test_the_page_loads_nothing_and_logs_no_error_in_headless_chromium(lm_run, tmp_path):
    run, _ = lm_run
    zh, _ = owngpt.report.write_report([run], out=tmp_path / "zh.html", lang="zh", samples=False)
    assert "验证损失" in zh.read_text() and 'lang="zh-CN"' in zh.read_text()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium binary (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for page_file in (run / "report.html", zh):
                page = browser.new_page()
                requests, failed, errors = [], [], []
                page.on("request", lambda r, requests=requests: requests.append(r.url))
                page.on("requestfailed", lambda r, failed=failed: failed.append(r.url))
                page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.goto(page_file.as_uri())
                page.wait_for_load_state("load")
                assert not failed and not errors, (failed, errors)
                assert all(u == page_file.as_uri() or u.startswith("data:") for u in requests), requests
                # every inline image decoded (a broken data URI has naturalWidth 0)
                widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
                assert widths and min(widths) > 0
                assert page.locator("section").count() == len(SECTIONS)
                page.close()
        finally:
            browser.close()


def test_two_runs_side_by_side(lm_run, tmp_path):
    run, data = lm_run
    other = train(quick_cfg(data, tmp_path / "b", "tiny", block_size=32, lr=1e-3, report=False)).run_dir
    assert not (other / "report.html").exists()
    code = main(["report", str(run), str(other), "--out", str(tmp_path / "cmp.html"), "--no-samples"])
    assert code == 0
    c = parse(tmp_path / "cmp.html")
    assert tuple(c.sections) == SECTIONS
    assert num(c, "config.lr", 0) == pytest.approx(3e-3) and num(c, "config.lr", 1) == pytest.approx(1e-3)
    best_b = min(r["val_loss"] for r in history(other) if "val_loss" in r)
    assert num(c, "best.val_loss", 1) == pytest.approx(best_b)
    html = (tmp_path / "cmp.html").read_text()
    assert html.count("data:image/png") == 2  # loss and lr: each one figure with both runs overlaid


def test_a_classifier_report_has_confusion_per_class_scores_and_confident_mistakes(tmp_path):
    from owngpt.classify_eval import classification_metrics
    from owngpt.predict import load_classifier, predict_proba

    rows = [(t, "pos") for t in ("so good", "good film", "really good", "good good")] * 3
    rows += [(t, "neg") for t in ("so bad", "bad film", "really bad", "bad bad")] * 3
    data = fixtures.write_classify_data_dir(tmp_path / "cls", rows, rows[::2])
    run = train(quick_cfg(data, tmp_path / "run", "tiny", task="classify", max_steps=4, eval_every=2)).run_dir
    html, _ = owngpt.report.write_report([run])
    c = parse(html)
    clf = load_classifier(run / "checkpoints" / "best")
    val = [json.loads(x) for x in (data / "val.jsonl").read_text().splitlines()]
    probs = predict_proba(clf, [r["text"] for r in val])
    y = [clf.labels.index(r["label"]) for r in val]
    m = classification_metrics(y, probs.argmax(-1), clf.labels)
    for lab in clf.labels:
        assert num(c, f"per_class.{lab}.recall") == pytest.approx(m["per_class"][lab]["recall"])
        assert num(c, f"per_class.{lab}.support") == m["per_class"][lab]["support"]
    text = html.read_text()
    assert "Confusion matrix" in text and "Most confident mistakes" in text
    wrong = [(probs[i].max(), i) for i in range(len(y)) if probs[i].argmax() != y[i]]
    shown = [
        float(x)
        for k, v in c.cells.items()
        for x in v.values()
        if k.startswith("mistakes.") and k.endswith(".probability")
    ]
    if wrong:
        assert max(shown) == pytest.approx(max(w for w, _ in wrong))
    best = max(r["accuracy"] for r in history(run) if "accuracy" in r)
    assert num(c, "best.accuracy") == pytest.approx(best)


def test_a_chat_report_shows_dialogue_turns(tmp_path, tiny_ckpt):
    data = write_chat_data_dir(tmp_path / "chat")
    run = train(quick_cfg(data, tmp_path / "run", tiny_ckpt, task="chat", max_steps=2, eval_every=2)).run_dir
    html, md = owngpt.report.write_report([run], max_new_tokens=12, mmi=str(tiny_ckpt))
    text = html.read_text()
    assert "hear me speak" in text and "are you resolved?" in text  # two user turns of a validation conversation
    assert "reranked by MMI" in text
    assert "Dialogue" in md.read_text()


def test_a_failing_report_never_fails_the_run(tmp_path, tiny_lm_data, monkeypatch, capsys):
    import owngpt.report as rep

    def broken(*a, **k):
        raise RuntimeError("planted")

    monkeypatch.delenv("OWNGPT_NO_REPORT", raising=False)
    monkeypatch.setattr(rep, "write_report", broken)
    res = train(quick_cfg(tiny_lm_data, tmp_path / "run", "tiny", max_steps=2, eval_every=2))
    assert res.steps == 2 and res.best_checkpoint is not None
    assert "warning: the run's report could not be written (RuntimeError: planted)" in capsys.readouterr().err


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not an owngpt run dir" in capsys.readouterr().err


def test_report_replaces_only_its_own_pages(lm_run, tmp_path, capsys):
    """--out at a page of the user's (or next to a .md of theirs) is refused untouched; an owngpt report is replaced."""
    run, _ = lm_run
    mine, twin = tmp_path / "mine.html", tmp_path / "notes.md"
    mine.write_text("<html>my page</html>")
    twin.write_text("my notes")
    for out in (mine, tmp_path / "notes.html"):
        assert main(["report", str(run), "--out", str(out), "--no-samples"]) == 2
        assert "is not an owngpt report" in capsys.readouterr().err
    assert mine.read_text() == "<html>my page</html>" and twin.read_text() == "my notes"
    assert not (tmp_path / "notes.html").exists()
    assert main(["report", str(run), "--out", str(mine), "--no-samples", "--overwrite"]) == 0
    assert tuple(parse(mine).sections) == SECTIONS
    mine.with_suffix(".md").write_text("stale")
    assert main(["report", str(run), "--out", str(mine), "--no-samples"]) == 0  # our own page: replaced as it is
    assert mine.with_suffix(".md").read_text() != "stale"


def test_report_writes_pictures_only_into_its_own_folder(lm_run, tmp_path, capsys):
    """page_files/ holding a user's pictures (same names as ours) is refused untouched; ours is written again."""
    run, _ = lm_run
    page = tmp_path / "page.html"
    theirs = tmp_path / "page_files"
    theirs.mkdir()
    (theirs / "loss.png").write_bytes(b"my holiday photo")
    assert main(["report", str(run), "--out", str(page), "--no-samples"]) == 2
    assert "was not made by owngpt report" in capsys.readouterr().err
    assert (theirs / "loss.png").read_bytes() == b"my holiday photo" and not page.exists()
    assert main(["report", str(run), "--out", str(page), "--no-samples", "--overwrite"]) == 0
    assert (theirs / "loss.png").read_bytes().startswith(b"\x89PNG")
    ours = tmp_path / "ours.html"
    assert main(["report", str(run), "--out", str(ours), "--no-samples"]) == 0
    assert main(["report", str(run), "--out", str(ours), "--no-samples"]) == 0  # a report's own folder: rewritten
    assert "(ours_files/loss.png)" in ours.with_suffix(".md").read_text()


def test_tune_writes_the_report_of_its_best_trial_only(tmp_path, tiny_lm_data, monkeypatch):
    pytest.importorskip("optuna")
    from owngpt.tune import Param, tune

    monkeypatch.delenv("OWNGPT_NO_REPORT", raising=False)
    base = quick_cfg(tiny_lm_data, tmp_path / "unused", "tiny", max_steps=2, eval_every=2)
    r = tune(base, out=tmp_path / "t", trials=2, space={"lr": Param("lr", "cat", choices=(1e-3, 3e-3))}, log=print)
    reports = sorted(p.parent.name for p in (tmp_path / "t").glob("trial_*/report.html"))
    assert reports == [f"trial_{r.best_trial:04d}"]
    c = parse(tmp_path / "t" / reports[0] / "report.html")
    assert num(c, "best.val_loss") == pytest.approx(r.best_value)
