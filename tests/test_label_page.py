"""The ranking page (``chat/static/label.html``) in Debian's chromium, driven by Playwright,
against the real label app: an annotator ranks three prompts with the mouse (drag) and the
keyboard (1..K, arrows, t, u, d, Enter); the file then holds three valid rankings (one tied,
one "all unacceptable" with a better answer) and a tiny reward model trains on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.chat.label import Item, LabelStore, RunningLabel, sibling
from chatforge.data.records import iter_canonical, msg

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
HOSTILE = '<img src=x onerror="window.__pwned = 1"> <b>bold?</b>'


def items() -> list[Item]:
    texts = [["The sky is blue because air scatters blue light most.", "Because it is.", HOSTILE],
             ["Paris.", "Lyon, I think.", "France has no capital."],
             ["Boil water, add pasta, wait ten minutes.", "Pasta is Italian.", "Microwave it dry."]]
    return [Item(f"q{i}", [msg("user", f"Question {i}?")], t, [{"model": f"m{j}"} for j in range(3)])
            for i, t in enumerate(texts)]


@pytest.fixture
def app(tmp_path):
    srv = RunningLabel(LabelStore(items(), tmp_path / "rankings.jsonl"), api_key="sekrit")
    yield srv
    srv.close()


@pytest.fixture
def page(app):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        problems: list[str] = []
        pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        pg.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
        pg.set_default_timeout(10_000)
        pg.goto(app.url + "/")
        yield pg
        browser.close()
        assert problems == []


def expect(locator):
    return sync_api.expect(locator)


def card_texts(page) -> list[str]:
    return page.locator("#candidates .cand .text").all_inner_texts()


def wait_for_prompt(page, n: int) -> None:
    expect(page.locator("#prompt")).to_contain_text(f"Question {n}?")


def test_rank_three_prompts_with_mouse_and_keyboard_then_train(page, app, tmp_path):
    expect(page.locator("#api-key")).to_be_visible()  # the server has a key: the page asks for it
    page.fill("#api-key", "sekrit")
    page.press("#api-key", "Tab")
    expect(page.locator("#message")).to_contain_text("Enter your name")
    page.fill("#annotator", "alice")
    page.press("#annotator", "Tab")
    wait_for_prompt(page, 0)
    expect(page.locator("#keys")).to_contain_text("Shift + ↑ ↓")  # the keys are on the page
    assert page.locator("#candidates img, #candidates b").count() == 0  # model text stays text
    assert HOSTILE in card_texts(page)
    assert page.evaluate("window.__pwned") is None

    # 1: the mouse. Submitting an untouched list is refused; then drag the best answer to the top
    page.click("#submit")
    expect(page.locator("#message")).to_contain_text("Rank the answers first")
    page.evaluate("window.scrollTo(0, 0)")  # the click scrolled down to the button; both cards in view
    before = card_texts(page)
    page.locator("#candidates .cand").last.drag_to(page.locator("#candidates .cand").first)
    want0 = card_texts(page)
    assert want0 == [before[2], before[0], before[1]]  # the last answer was dropped on the first
    page.locator("#candidates .cand").nth(2).locator("button.up").click()  # and a ▲ click
    want0 = [want0[0], want0[2], want0[1]]
    assert card_texts(page) == want0
    page.click("#submit")
    wait_for_prompt(page, 1)

    # 2: the keyboard: 3 then 1 (the last follows), then tie the second with the first
    page.locator("body").click(position={"x": 5, "y": 5})
    shown = card_texts(page)
    page.keyboard.press("3")
    page.keyboard.press("1")
    want1 = [shown[2], shown[0], shown[1]]
    assert card_texts(page) == want1
    page.keyboard.press("t")  # the selected answer is the last picked (second place)
    expect(page.locator("#candidates .cand.tied")).to_have_count(1)
    page.keyboard.press("Enter")
    wait_for_prompt(page, 2)

    # 3: keyboard again: pick 2, 1; select down, move it up; all unacceptable; a better answer
    shown = card_texts(page)
    page.keyboard.press("2")
    page.keyboard.press("1")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Shift+ArrowUp")
    want2 = [shown[1], shown[2], shown[0]]
    assert card_texts(page) == want2
    page.keyboard.press("u")
    expect(page.locator("#unacceptable")).to_be_checked()
    page.keyboard.press("d")
    page.keyboard.type("Boil salted water, cook the pasta al dente, drain.")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_contain_text("Nothing left")

    page.click("#show-progress")
    expect(page.locator("#annotators tbody tr")).to_have_count(1)
    expect(page.locator("#annotators tbody td").nth(1)).to_have_text("3")

    out = tmp_path / "rankings.jsonl"
    recs = list(iter_canonical(out))
    assert [[r["content"] for r in rec.responses] for rec in recs] == [want0, want1, want2]
    assert [rec.tiers for rec in recs] == [None, [0, 0, 1], None]
    assert [rec.meta["unacceptable"] for rec in recs] == [False, False, True]
    assert all(rec.meta["annotator"] == "alice" and rec.meta["source"] == "human" for rec in recs)
    (demo,) = iter_canonical(sibling(out, "demos"))
    assert demo.messages[-1]["content"] == "Boil salted water, cook the pasta al dente, drain."

    from chatforge.train.rm import RMConfig, train

    cfg = RMConfig(model="tiny", data=[str(out)], out=str(tmp_path / "rm"), precision="fp32", max_len=64,
                   batch_size=2, grad_accum=1, max_steps=2, eval_fraction=0.0, loss="listwise", eval_every=1000,
                   save_every=1000, log_every=1)
    cfg.validate()
    train(cfg)
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["train_groups"] == 3 and summary["data"]["kept"] == {"all answers unacceptable (order kept)": 1}


def test_all_unacceptable_without_an_order_states_no_order(page, app, tmp_path):
    page.fill("#api-key", "sekrit")
    page.press("#api-key", "Tab")
    page.fill("#annotator", "bob")
    page.press("#annotator", "Tab")
    wait_for_prompt(page, 0)
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("u")
    page.keyboard.press("Enter")  # the shown (random) order is not a judgement
    wait_for_prompt(page, 1)
    (rec,) = iter_canonical(tmp_path / "rankings.jsonl")
    assert rec.meta["unacceptable"] is True and rec.tiers == [0, 0, 0]
