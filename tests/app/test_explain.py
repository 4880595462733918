"""The HTML report in a real browser: headless Chromium renders it with no network, and the plots
must be in the rendered page and the page must not be blank.

Chromium missing: the tests skip, except under CI (environment variable CI set), where they fail.
The README screenshot comes from here:

    TL_DEPASS_SCREENSHOT=docs/report.png python -m pytest tests/app/test_explain.py
"""

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tl_depass
from tl_depass import tasks
from tl_depass.app import explain as report
from tl_depass.app import html
from tl_depass.app.cli import main
from tl_depass.app.results import Explanation, LevelScores
from tl_depass.levels.label import Label

MODEL = "induction"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=20000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "no Chromium binary on PATH (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test")
    pytest.skip(reason)


def browse(html: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args,
                           html.resolve().as_uri()], capture_output=True, text=True, timeout=180,
                          check=True)


class Classes(HTMLParser):
    """Counts the elements carrying each CSS class; collects what the page would fetch."""

    def __init__(self):
        super().__init__()
        self.count: dict[str, int] = {}
        self.meta: dict[str, str] = {}
        self.fetches: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.fetches.append(f"<{tag} {key}={attrs[key]}>")
        if tag == "meta" and "name" in attrs:
            self.meta[attrs["name"]] = attrs.get("content", "")
        for c in (attrs.get("class") or "").split():
            self.count[c] = self.count.get(c, 0) + 1


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["explain", "--model", MODEL, "--out", str(out), "--quiet"]) == 0
    return out


def test_report_is_self_contained(page):
    parsed = Classes()
    parsed.feed(page.read_text(encoding="utf-8"))
    assert parsed.fetches == []  # no script, style sheet or image from anywhere: plotly.js inline
    # the bundled induction model is attention-only: tokens, their build-up through the residual
    # stream, heads, the top heads' attention patterns, head x source token, modules,
    # completeness, scatter
    assert parsed.meta["depass-figures"] == "8"
    assert parsed.count["depass-figure"] == 8
    assert parsed.count["explain"] == 5  # what each of five figures shows, in words
    assert parsed.count["vocab"] == 3  # the top tokens of the top tokens, heads and modules


def test_plots_render_in_chromium(page, tmp_path):
    dom = browse(page, tmp_path, "--dump-dom").stdout
    parsed = Classes()
    parsed.feed(dom)
    n = int(parsed.meta["depass-figures"])
    # plotly.js ran: every figure became a plot with its SVG layers and the right trace types
    assert parsed.count.get("js-plotly-plot") == n
    assert parsed.count.get("main-svg", 0) >= 2 * n
    # tokens, build-up, heads, head x source token, and one per top head's attention pattern
    assert parsed.count.get("heatmaplayer", 0) >= 4 + 4
    assert parsed.count.get("barlayer", 0) >= 1  # modules
    assert parsed.count.get("scatterlayer", 0) >= 2  # completeness and DePass vs patching
    assert "total effect on" in dom  # the heads title, drawn as SVG text by plotly
    assert "read directly from the last position" in dom  # the build-up's title
    assert "what each head wrote, by source token" in dom  # the head x source token title
    assert "Clean attention patterns" in dom  # the head view


def test_screenshot_is_not_blank(page, tmp_path):
    png = tmp_path / "report.png"
    browse(page, tmp_path, f"--screenshot={png}", "--window-size=1100,1500")
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1500, 1100)
    assert pixels.std() > 20  # a blank or single-colour page has (near) zero variance
    coloured = (np.abs(pixels - pixels.mean(-1, keepdims=True)).max(-1) > 30).mean()
    assert coloured > 0.02  # the heatmaps are drawn (not just black text on white)
    target = os.environ.get("TL_DEPASS_SCREENSHOT")
    if target:  # the README picture: the whole report (every view), 256 colours, under 1 MB
        tall = tmp_path / "tall.png"  # a window taller than the page, cut below its last ink
        browse(page, tmp_path, f"--screenshot={tall}", "--window-size=1100,9000")
        image = Image.open(tall).convert("RGB")
        ink = np.nonzero((np.asarray(image) < 245).any(axis=(1, 2)))[0]
        assert ink.max() < image.height - 100  # the whole page fits the window
        image = image.crop((0, 0, 1100, int(ink.max()) + 30))
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
        assert Path(target).stat().st_size < 1_000_000


def test_report_numbers_match_the_library(tmp_path):
    """The report's head scores are DePass' own readout (`head_scores`) and its patching effects
    are transformer_lens' head patching, shifted by the corrupted metric."""
    from transformer_lens import patching

    from tl_depass.models import load

    model = load(MODEL)
    batch = tasks.generate(MODEL, 1, seed=0)
    answer, wrong = int(batch.answers[0]), int(batch.wrong[0])
    ex = report.explain(model, report.Prompt(batch.tokens, answer, wrong, batch.corrupted),
                        levels=["heads"], progress=False)
    dec = tl_depass.decompose(model, batch.tokens, tl_depass.Heads())
    torch.testing.assert_close(ex.levels["heads"].depass,
                               dec.head_scores(answer, wrong)[0].flatten())

    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    _, cache = model.run_with_cache(batch.tokens)
    patched = patching.get_act_patch_attn_head_out_all_pos(model, batch.corrupted, cache, metric)
    torch.testing.assert_close(ex.levels["heads"].patching,
                               (patched - metric(model(batch.corrupted))).flatten())
    path = report.write_html(ex, tmp_path / "heads.html")
    assert "<h2>Heads</h2>" in path.read_text(encoding="utf-8")


def test_show_fits_the_level():
    """dec.show() draws the readout of the level: token shares, the head grid, top components."""
    import circuitsvis.utils.render

    from tl_depass.models import load

    model = load("recall")
    batch = tasks.generate("recall", 2, seed=0)
    tokens, answer, wrong = batch.tokens, batch.answers, batch.wrong
    dec = tl_depass.decompose(model, tokens)
    fig = dec.show(answer, wrong)
    assert fig.data[0].type == "heatmap"
    z = torch.tensor(fig.data[0].z, dtype=torch.float32)
    torch.testing.assert_close(z, dec.logit_attribution(answer, wrong)[:-1].T)  # a row per prompt
    heads = tl_depass.decompose(model, tokens, tl_depass.Heads())
    fig = heads.show(answer, wrong, batch=1)
    z = torch.tensor(fig.data[0].z, dtype=torch.float32)
    torch.testing.assert_close(z, heads.head_scores(answer, wrong)[1])
    neurons = tl_depass.decompose(model, tokens, tl_depass.Neurons(0))
    fig = neurons.show(answer, wrong, k=5)
    scores = neurons.logit_attribution(answer, wrong)[:, 0]
    best = scores[1:-1].abs().argmax().item() + 1  # the first component is "L0 rest"
    assert fig.data[0].type == "bar" and fig.data[0].y[-1] == neurons.labels[best]  # top at the top
    assert len(fig.data[0].y) == 5 and "L0 rest" not in fig.data[0].y
    view = dec.show(answer, kind="circuitsvis", batch=1)
    assert isinstance(view, circuitsvis.utils.render.RenderedHTML)
    with pytest.raises(tl_depass.DepassError, match="token-level"):
        heads.show(answer, kind="circuitsvis")


def test_deprecated_positional_call_warns_and_agrees():
    """explain(model, tokens, target, wrong, corrupted, rule, ...) still works, with a warning,
    and computes what explain(model, Prompt(...), rule=...) does."""
    from tl_depass.models import load

    model = load(MODEL)
    batch = tasks.generate(MODEL, 1, seed=0)
    answer, wrong = int(batch.answers[0]), int(batch.wrong[0])
    new = report.explain(model, report.Prompt(batch.tokens, answer, wrong, batch.corrupted),
                         levels=["heads"], rule="ratio", model_name="m", progress=False)
    with pytest.warns(DeprecationWarning, match="Prompt"):
        old = report.explain(model, batch.tokens, answer, wrong, batch.corrupted, "ratio", None, "m",
                             ["heads"], False)
    assert old.rule == new.rule == "ratio" and old.model_name == "m" and list(old.levels) == ["heads"]
    torch.testing.assert_close(old.levels["heads"].depass, new.levels["heads"].depass)
    torch.testing.assert_close(old.levels["heads"].patching, new.levels["heads"].patching)
    with pytest.raises(tl_depass.DepassError, match="keyword"):
        report.explain(model, report.Prompt(batch.tokens, answer), "ratio")
    with pytest.raises(tl_depass.DepassError, match="same length"):
        report.Prompt(batch.tokens, answer, wrong, batch.corrupted[:, :-1])
    with pytest.raises(tl_depass.DepassError, match="not a token id"):
        report.explain(model, report.Prompt(batch.tokens, model.cfg.d_vocab), progress=False)


def test_render_from_a_saved_explanation(tmp_path):
    """Rendering reads only the Explanation: one computed once and saved renders, without the
    model, to the same page every time (figure ids are fixed, not random)."""
    from tl_depass.models import load

    model = load(MODEL)
    batch = tasks.generate(MODEL, 1, seed=0)
    prompt = report.Prompt(batch.tokens, int(batch.answers[0]), int(batch.wrong[0]), batch.corrupted)
    ex = report.explain(model, prompt, levels=["tokens", "heads"], progress=False)
    torch.save(ex, tmp_path / "ex.pt")
    del model
    saved = torch.load(tmp_path / "ex.pt", weights_only=False)
    page = html.render(saved)
    assert html.render(saved) == page == html.render(ex)
    path = report.write_html(saved, tmp_path / "a.html")  # the old import path still works
    assert html.write_html(saved, tmp_path / "b.html").read_text(encoding="utf-8") == \
        path.read_text(encoding="utf-8") == page
    assert "<h2>Token contributions</h2>" in page and "<h2>Heads</h2>" in page


def test_render_a_constructed_explanation():
    """An Explanation built by hand (no model anywhere) renders: facts, tables and figures."""
    heads = LevelScores(["L0H0", "L0H1", "L1H0", "L1H1"], torch.tensor([0.5, -0.25, 1.0, 0.0]),
                  torch.tensor([0.4, -0.1, 0.9, 0.05]), 0.9, 0.8, {"blocks.0.hook_resid_pre": 1e-9},
                  components=[Label(f"L{layer}H{h}", "head", layer, h) for layer in (0, 1) for h in (0, 1)])
    tokens = LevelScores(["tok 0 a", "tok 1 b", "bias"], torch.tensor([0.75, 0.5, 0.0]),
                   completeness={"hook_embed": 2e-9})
    ex = Explanation("hand-made", ["a", "b"], " c", None, 1.25, "softmax", 1e-5, None, None,
                     {"tokens": tokens, "heads": heads}, torch.tensor([[0.75, 0.5], [0.25, 1.0]]), None)
    page = html.render(ex)
    assert page == html.render(ex)
    parsed = Classes()
    parsed.feed(page)
    # tokens, heads, completeness, DePass vs patching
    assert parsed.fetches == [] and parsed.meta["depass-figures"] == "4"
    assert "logit(&#x27; c&#x27;)</code> at the last position = +1.2500" in page
    assert "worst relative error 2.0e-09" in page and "Pearson 0.90, Spearman 0.80" in page
    assert "<td>L1H0</td><td>+1.000</td><td>+0.900</td>" in page
