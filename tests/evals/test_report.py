"""The HTML eval report: self-contained, and rendered by a real headless browser (Chromium) when one is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from phitune.evals.generation import summarize
from phitune.evals.prompts import Skipped
from phitune.evals.report import read_summary, write_report, write_samples

RECORDS = [{"step": s, "epoch": s / 10, "loss": 3.0 / s} for s in (1, 2, 3, 4)] + [
    {"step": 4, "epoch": 0.4, "eval_loss": 1.0, "gen_exact_match": 0.5,
     "generation_prompts": [{"index": 0, "prompt": "<|user|>Q0<|end|><|assistant|>", "reference": "A0"}],
     "generations": [{"index": 0, "answer": "A0", "exact_match": 1.0, "rouge_l": 1.0, "stopped": True}]}]


def _answer(text, em, rouge, stopped=True):
    return {"answer": text, "exact_match": em, "token_f1": rouge, "rouge_l": rouge, "answer_tokens": len(text),
            "stopped": stopped}


def _samples():
    rows = []
    for i, (verdict, base, tuned) in enumerate([("better", (0.0, 0.2), (1.0, 1.0)), ("worse", (1.0, 1.0), (0.0, 0.5)),
                                                ("same", (0.0, 0.3), (0.0, 0.3)), ("better", (0.0, 0.1), (0.0, 0.6))]):
        rows.append({"index": i, "prompt": f"<|user|>Question {i} <b>&</b><|end|><|assistant|>",
                     "reference": f"Answer {i}", "base": _answer(f"base {i}", *base),
                     "tuned": _answer(f"tuned {i}", *tuned, stopped=i != 3), "verdict": verdict})
    return rows


def _write(tmp_path):
    samples = _samples()
    skipped = Skipped()
    skipped.add("with a prompt longer than the model's context of 64 tokens")
    summary = summarize(samples, compare_base=True, metric_names=[], skipped=skipped,
                        eval_metrics={"eval_loss": 1.0, "eval_perplexity": 2.7},
                        base_eval_metrics={"eval_loss": 2.0, "eval_perplexity": 7.4})
    summary.update(prompts=4, interrupted=False, settings={"max_new_tokens": 16, "greedy": True, "batch_size": 2,
                                                           "primary_scores": ["exact_match", "rouge_l"]})
    return write_report(tmp_path / "report.html", summary, samples, train_records=RECORDS, title="t"), summary


def test_report_is_self_contained_and_embeds_the_summary(tmp_path):
    path, summary = _write(tmp_path)
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", text)  # no network asset
    assert "<link" not in text and "<svg id='loss-curve'" in text and "<polyline" in text
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in text  # prompts are escaped, never markup
    assert read_summary(text)["verdicts"] == {"better": 2, "worse": 1, "same": 1}
    assert read_summary(text)["delta"]["eval_loss"] == -1.0
    assert "Answers during training" in text and "step 4" in text
    assert "Skipped 1" in text
    out = write_samples(tmp_path / "samples.jsonl", _samples())
    assert [json.loads(line)["verdict"] for line in out.read_text().splitlines()] == ["better", "worse", "same",
                                                                                       "better"]


def test_report_shows_sampled_answers_next_to_the_greedy_table(tmp_path):
    samples = _samples()
    summary = summarize(samples, compare_base=True, metric_names=[], skipped=Skipped())
    summary.update(settings={"max_new_tokens": 16, "greedy": True}, sampled={
        "temperature": 0.7, "top_p": 0.9, "seeds": 2, "exact_match": 0.925, "stopped": 1.0,
        "per_seed": [{"seed": 0, "exact_match": 0.9, "stopped": 1.0},
                     {"seed": 1, "exact_match": 0.95, "stopped": 1.0}]})
    text = write_report(tmp_path / "report.html", summary, samples).read_text()
    assert ("<p id='sampled'>Sampled instead of greedy (temperature 0.7, top-p 0.9, 2 seeds), the tuned model's "
            "answers match exactly in 92.5% and end their turn in 100.0% (exact match per seed: 90.0%, 95.0%).</p>"
            ) in text
    assert text.index("id='metrics'") < text.index("id='sampled'") < text.index("<h2>Samples</h2>")
    assert read_summary(text)["sampled"]["exact_match"] == 0.925
    del summary["sampled"]
    assert "id='sampled'" not in write_report(tmp_path / "plain.html", summary, samples).read_text()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dump_dom(browser, url, profile):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium); the report's "
                                                "rendering is then checked only as text")
def test_report_renders_table_and_samples_in_a_headless_browser(tmp_path):
    path, _ = _write(tmp_path)
    browser = _chromium()
    dom = _dump_dom(browser, path.as_uri(), tmp_path / "profile")
    assert 'data-ready="1"' in dom  # the inline script ran
    assert dom.count('<tr class="sample"') == 4 and "hidden" not in re.findall(r"<tr class=\"sample\"[^>]*>", dom)[0]
    # metric, base, tuned, delta: 3 of 4 tuned answers ended their turn, all 4 base ones
    assert '<td>ended its turn</td><td>100.0%</td><td>75.0%</td><td class="down">-25.0%</td>' in dom
    assert 'id="shown">4<' in dom

    dom = _dump_dom(browser, path.as_uri() + "#filter=worse", tmp_path / "profile2")
    rows = re.findall(r"<tr class=\"sample\"[^>]*>", dom)
    visible = [r for r in rows if "hidden" not in r]
    assert len(rows) == 4 and len(visible) == 1 and 'data-verdict="worse"' in visible[0]
    assert 'data-filter="worse"' in dom and 'id="shown">1<' in dom
