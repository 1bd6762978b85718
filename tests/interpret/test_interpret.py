"""Interpret: hand-built routing is reported as built; the CLI writes a dashboard a real browser can use."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tiny_onn.cli import main
from tiny_onn.data import PackedData
from tiny_onn.interpret.dashboard import PAGE_SIZE, render_dashboard
from tiny_onn.interpret.profiles import auto_label, layer_nmi, record_routing, selection_rate, token_log_odds
from tiny_onn.model import TinyOnnConfig, TinyOnnForCausalLM

CODE_TOKENS, CHAT_TOKENS = range(10, 20), range(20, 30)


def hand_routed_model() -> TinyOnnForCausalLM:
    """One layer whose hidden state is the token embedding (attention output zeroed); coordinate 0 of the embedding is
    +1 for code tokens and -1 otherwise, and the router sends coordinate 0 to expert 0: expert 0 gets only code (and
    expert 1 only chat)."""
    cfg = TinyOnnConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        num_experts=3, num_experts_per_tok=1, moe_intermediate_size=4)
    torch.manual_seed(0)
    model = TinyOnnForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.1)
        emb[:, 0] = -1.0
        emb[list(CODE_TOKENS), 0] = 1.0
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        router = model.model.layers[0].mlp.router.weight
        router.zero_()
        router[0, 0] = 20.0
        router[1, 0] = -20.0  # and every other token to expert 1
    return model


def hand_data() -> PackedData:
    g = torch.Generator().manual_seed(0)
    code = torch.tensor(list(CODE_TOKENS))[torch.randint(0, 10, (4, 16), generator=g)]
    chat = torch.tensor(list(CHAT_TOKENS))[torch.randint(0, 10, (4, 16), generator=g)]
    ids = torch.cat([code, chat])
    cats = torch.cat([torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long)])
    return PackedData(ids, ids.clone(), torch.ones_like(ids), cats, ["code", "chat"])


def test_hand_routing_shows_in_heatmap_log_odds_and_label():
    rec = record_routing(hand_routed_model(), hand_data())
    rate = selection_rate(rec)[0]  # [E, C]
    assert rate[0, 0] == 1.0 and rate[0, 1] == 0.0  # expert 0: every code token, no chat token
    top = token_log_odds(rec, 0, 0, top=5, min_count=1)
    assert top and all(t in CODE_TOKENS for t, _, _ in top)
    ids = hand_data().input_ids
    for t, _, n in top:  # expert 0 takes every code token: its count of t is t's count in the code rows
        assert n == int((ids[:4] == t).sum())
    assert rec.token_expert.shape[-1] == rec.vocab.numel() == ids.unique().numel()  # seen tokens only
    label = auto_label(rec, 0, 0, decode=lambda t: f"tok{t}")
    assert label["dominant_category"] == "code" and label["specificity"] == pytest.approx(1.0)
    assert label["label"].startswith("code: tok1")
    assert layer_nmi(rec)[0] == pytest.approx(1.0)
    # expert 2 is never selected (its router row is 0 against ±20): no category distribution, so no specificity
    assert float(rate[2].sum()) == 0.0
    never = auto_label(rec, 0, 2, decode=lambda t: f"tok{t}")
    assert never == {"label": "(never selected)", "dominant_category": "(never selected)", "specificity": 0.0,
                     "category_share": [0.0, 0.0]}


def test_interpret_cli_and_dashboard_in_a_browser(tiny_moe, tmp_path):
    moe, data = tiny_moe
    out = tmp_path / "report"
    assert main(["interpret", "--model", str(moe), "--data", str(data), "--seq-len", "32", "--tokens", "512",
                 "--device", "cpu", "--out", str(out)]) == 0
    for name in ("dashboard.html", "interpret.json", "labels.json", "heatmap.png", "nmi.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "interpret.json").read_text())
    assert len(report["layers"]) == 2 and len(report["layers"][0]["experts"]) == 4
    html = (out / "dashboard.html").read_text()
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")

    errors = []
    with browser_page(out / "dashboard.html", errors) as page:
        assert page.locator("#experts tbody tr").count() == 4
        page.select_option("#layer", "1")
        page.locator("#experts tbody tr").nth(2).locator("td").first.click()
        assert page.locator("#which").inner_text().startswith("2")
        assert page.locator("#tokens table").count() == 1
        page.locator("#experts tbody tr input").first.fill("my label")
        with page.expect_download() as download:
            page.click("#export")
        saved = json.loads(Path(download.value.path()).read_text())
        assert saved["labels"][1][0] == "my label"
        page.screenshot(path=str(tmp_path / "dashboard.png"))
    assert not errors, errors
    assert (tmp_path / "dashboard.png").stat().st_size > 1000


@contextlib.contextmanager
def browser_page(html: Path, errors: list[str]):
    """`html` opened in headless Chromium (skips without playwright or Debian's chromium); console and page errors are
    appended to `errors`."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser test")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it where it can)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(html.as_uri())
        yield page
        browser.close()


def many_experts_dashboard(experts: int) -> dict:
    """Dashboard data of one layer with `experts` experts: expert e is selected at rate e / experts (so sorting by
    selection reverses the index order), dominated by "code" when e is a multiple of 7, with token "tok<e>"."""
    rows = [{"dominant": "code" if e % 7 == 0 else "chat", "specificity": (e % 10) / 10, "selected": e / experts,
             "rate": [e / experts, 0.0], "xy": [float(e % 17), float(e // 17)], "tokens": [[f"tok{e}", 1.0, 3]],
             "snippets": [{"prob": 0.5, "left": "x ", "token": f"tok{e}", "right": " y", "text": f"x [[tok{e}]] y"}]}
            for e in range(experts)]
    return {"title": "many", "categories": ["code", "chat"], "layers": [{"nmi": 0.1, "experts": rows}],
            "labels": [[f"expert {e}" for e in range(experts)]]}


def test_dashboard_pages_sorts_and_filters_many_experts(tmp_path):
    """A layer of 250 experts: pages of PAGE_SIZE rows in the table and the heatmap, sorting by selection rate, a text
    filter, and a click on the map opening the clicked expert's page."""
    experts = 250
    html = tmp_path / "dashboard.html"
    html.write_text(render_dashboard(many_experts_dashboard(experts), "test"), encoding="utf-8")
    rows = lambda p: [int(t) for t in p.locator("#experts tbody tr td:first-child").all_inner_texts()]  # noqa: E731
    errors = []
    with browser_page(html, errors) as page:
        assert rows(page) == list(range(PAGE_SIZE))
        assert page.locator("#heat tr").count() == PAGE_SIZE + 1  # + the header row
        page.click("#next")
        page.click("#next")
        assert rows(page) == list(range(2 * PAGE_SIZE, experts))
        assert page.locator("#page").inner_text() == f"3 / {-(-experts // PAGE_SIZE)}"
        page.click("#next")  # past the last page: stays there
        assert rows(page) == list(range(2 * PAGE_SIZE, experts))
        page.click("th[data-key=selected]")  # highest selection rate first, back to page 1
        assert rows(page) == list(range(experts - 1, experts - 1 - PAGE_SIZE, -1))
        page.fill("#filter", "tok12")  # tok12 and tok120..tok129
        assert sorted(rows(page)) == [12, *range(120, 130)]
        assert "of 11 (filtered from 250)" in page.locator("#shown").inner_text()
        page.fill("#filter", "")
        page.click("th[data-key=index]")
        page.locator("#scatter circle").nth(230).click()  # expert 230 is on page 3
        assert page.locator("#which").inner_text().startswith("230")
        assert 230 in rows(page) and page.locator("#page").inner_text().startswith("3 /")
    assert not errors, errors


def test_partial_byte_tokens_read_as_their_vocabulary_entries():
    from tiny_onn.interpret.interpreter import token_text

    class ByteTokenizer:  # two tokens that are each half of "é" (0xC3 0xA9) and one whole word
        vocab = {0: b"\xc3", 1: b"\xa9", 2: b"cafe"}
        names = {0: "Ã", 1: "©", 2: "cafe"}

        def decode(self, ids):
            return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

        def convert_ids_to_tokens(self, i):
            return self.names[i]

    tok = ByteTokenizer()
    assert tok.decode([0, 1]) == "é"
    assert [token_text(tok, t) for t in range(3)] == ["<Ã>", "<©>", "cafe"]


def test_dashboard_shows_category_names_and_snippets_as_text(tmp_path):
    """Category names come from the user's data: markup in them is shown, never run; a snippet that itself holds
    "[[" keeps its text, with only the token marked."""
    data = many_experts_dashboard(3)
    # "<!--<script>" in a name once made the page's own script part of the data block (a blank page)
    data["categories"] = ["<img src=x onerror=window.hacked=1>", "chat & <b>talk</b> <!--<script> </script>"]
    for row in data["layers"][0]["experts"]:
        row["dominant"] = data["categories"][0]
        row["snippets"] = [{"prob": 0.5, "left": "x[[0]] = ", "token": "tok", "right": " <i>", "text": "unused"}]
    html = tmp_path / "dashboard.html"
    html.write_text(render_dashboard(data, "test"), encoding="utf-8")
    errors = []
    with browser_page(html, errors) as page:
        assert page.locator("#heat th").all_inner_texts()[1:] == data["categories"]
        assert page.locator("#experts tbody tr td").nth(2).inner_text() == data["categories"][0]
        page.locator("#experts tbody tr").first.click()
        assert page.locator("#snips code").first.inner_text() == "x[[0]] = tok <i>"
        assert page.locator("#snips code b").first.inner_text() == "tok"
        assert page.evaluate("window.hacked") is None and page.locator("#heat img").count() == 0
    assert not errors, errors


def test_record_reads_exactly_the_token_budget():
    """Batches of 4 rows of 16 tokens: a budget of 70 records the first batch (64 code tokens) and 6 tokens of the
    second (chat), not the whole second batch."""
    rec = record_routing(hand_routed_model(), hand_data(), batch_size=4, max_tokens=70)
    assert rec.tokens_per_category.tolist() == [64.0, 6.0]
    assert rec.token_ids.numel() == 70 and rec.top1.shape[1] == 70
    assert torch.equal(rec.token_ids, hand_data().input_ids.reshape(-1)[:70])
    assert rec.selected.sum() == 70  # one expert per token
    full = record_routing(hand_routed_model(), hand_data(), batch_size=4)
    assert full.token_ids.numel() == 128


def test_one_category_has_no_nmi_and_the_cli_says_so(tiny_moe, tmp_path, caplog):
    data = hand_data()
    one = PackedData(data.input_ids[:4], data.labels[:4], data.attention_mask[:4], data.category[:4], ["code"])
    assert layer_nmi(record_routing(hand_routed_model(), one)) == [None]
    moe, data_file = tiny_moe
    categories = {json.loads(line)["category"] for line in Path(data_file).read_text().splitlines() if line.strip()}
    out = tmp_path / "report"
    with caplog.at_level("WARNING"):
        assert main(["interpret", "--model", str(moe), "--data", str(data_file), "--categories", sorted(categories)[0],
                     "--seq-len", "32", "--tokens", "128", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "interpret.json").read_text())
    assert report["nmi_per_layer"] == [None, None]
    assert "needs two categories" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # more tokens asked than the held-out split holds: all recorded, and said
        assert main(["interpret", "--model", str(moe), "--data", str(data_file), "--seq-len", "32", "--tokens",
                     "1000000", "--device", "cpu", "--out", str(tmp_path / "all")]) == 0
    recorded = json.loads((tmp_path / "all" / "interpret.json").read_text())["tokens"]
    assert recorded < 1000000 and f"holds {recorded} tokens, fewer than --tokens 1000000" in caplog.text


def test_category_names_with_dollar_signs_draw_as_text(tmp_path):
    """matplotlib reads text between two `$` as math: a category "price_$_a_$" failed to draw (after all the work)."""
    from tiny_onn.artifacts import figure_text
    from tiny_onn.interpret.interpreter import write_figures

    cats = ["price_$_a_$", r"$\frac{a$", "plain"]
    layer = {"experts": [{"selection_rate": [0.1, 0.2, 0.7]}, {"selection_rate": [0.5, 0.4, 0.1]}]}
    write_figures({"categories": cats, "layers": [layer, layer], "nmi_per_layer": [0.1, 0.2]}, tmp_path)
    assert (tmp_path / "heatmap.png").stat().st_size > 0 and (tmp_path / "nmi.png").stat().st_size > 0
    assert figure_text("a $5-$10 b") == r"a \$5-\$10 b"
