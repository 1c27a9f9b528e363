"""The evaluation report: ``eval/samples.jsonl`` and ``eval/report.html``, one self-contained page.

The page needs no network: CSS and the script are inline, the loss curve is an inline SVG. Every row is in the HTML
itself (readable with scripts off); the script adds sorting (click a column header) and the filter by verdict
("tuned better / worse / same"), also reachable as ``report.html#filter=worse``. It sets ``data-ready`` on
``<body>`` once it has run, which the browser test checks.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..runs.atomic import write_text


_LABELS = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L",
           "answer_tokens": "answer length (tokens)", "stopped": "ended its turn", "eval_loss": "eval loss",
           "eval_perplexity": "eval perplexity",
           "eval_preference_accuracy": "preference accuracy (chosen more likely than rejected)"}
_SHARES = ("exact_match", "stopped", "eval_preference_accuracy")  # shown as percentages
_FIX = "free space or make the folder writable, then run the evaluation again (the files there are intact)"


def read_generation_history(records: Sequence[dict]) -> dict[str, Any]:
    """From metrics.jsonl records: the probe's prompts and, per step, its answers (what the report shows)."""
    prompts = next((r["generation_prompts"] for r in records if "generation_prompts" in r), [])
    steps = [(r["step"], r["generations"]) for r in records if "generations" in r]
    return {"prompts": prompts, "steps": steps}


def dump_json(value: Any) -> str:
    """JSON for the report and samples.jsonl: NaN written as null (JSON has no NaN)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), ensure_ascii=False)


def write_samples(path: str | Path, samples: Sequence[dict]) -> Path:
    """One JSON object per sample: index, prompt, reference, tuned (answer + scores), base, verdict."""
    return write_text(path, "".join(dump_json(s) + "\n" for s in samples), "the eval samples", fix=_FIX)


def _fmt(key: str, value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    sign = "+" if signed and value > 0 else ""
    if key in _SHARES:
        return f"{sign}{100 * value:.1f}%"
    if key == "answer_tokens":
        return f"{sign}{value:.1f}"
    return f"{sign}{value:.4f}" if abs(value) < 100 else f"{sign}{value:.1f}"


def _metrics_table(summary: dict) -> str:
    tuned, base, delta = summary.get("tuned", {}), summary.get("base"), summary.get("delta", {})
    head = "<tr><th>metric</th>" + ("<th>base</th>" if base is not None else "") + "<th>tuned</th>" + \
           ("<th>delta</th>" if base is not None else "") + "</tr>"
    rows = []
    for key, value in tuned.items():
        label = html.escape(_LABELS.get(key, key))
        cells = f"<td>{label}</td>"
        if base is not None:
            cells += f"<td>{_fmt(key, base.get(key))}</td>"
        cells += f"<td>{_fmt(key, value)}</td>"
        if base is not None:
            d = delta.get(key)
            lower_is_better = key in ("eval_loss", "eval_perplexity")
            if d is None or d == 0 or key == "answer_tokens":  # a shorter answer is neither better nor worse
                cls = ""
            else:
                cls = " class='up'" if (d > 0) != lower_is_better else " class='down'"
            cells += f"<td{cls}>{_fmt(key, d, signed=True)}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table id='metrics'>{head}{''.join(rows)}</table>"


def _sampled_paragraph(sampled: dict) -> str:
    """The tuned model's answers sampled once per seed (``summary["sampled"]``), next to the greedy table."""
    per_seed = ", ".join(_fmt("exact_match", r["exact_match"]) for r in sampled.get("per_seed", []))
    return (f"<p id='sampled'>Sampled instead of greedy (temperature {sampled['temperature']:g}, top-p "
            f"{sampled['top_p']:g}, {sampled['seeds']} seeds), the tuned model's answers match exactly in "
            f"{_fmt('exact_match', sampled['exact_match'])} and end their turn in "
            f"{_fmt('stopped', sampled['stopped'])} (exact match per seed: {per_seed}).</p>")


def loss_curve_svg(records: Sequence[dict], width: int = 640, height: int = 240) -> str:
    """Train (and eval) loss against the step as an inline SVG; empty when there is no loss to draw."""
    series = [("train loss", "#1f77b4", [(r["step"], r["loss"]) for r in records if _num(r.get("loss"))]),
              ("eval loss", "#ff7f0e", [(r["step"], r["eval_loss"]) for r in records if _num(r.get("eval_loss"))])]
    series = [s for s in series if s[2]]
    if not series:
        return ""
    pts = [p for _, _, s in series for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    left, right, top, bottom = 56, 12, 12, 36

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f"<svg id='loss-curve' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' aria-label='loss curve'>",
             f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}' "
             "fill='none' stroke='#ccc'/>"]
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(f"<text x='{left - 4}' y='{sy(y) + 4:.1f}' text-anchor='end' font-size='11'>{y:.3g}</text>")
        x = x0 + frac * (x1 - x0)
        parts.append(f"<text x='{sx(x):.1f}' y='{height - bottom + 14}' text-anchor='middle' "
                     f"font-size='11'>{x:.0f}</text>")
    parts.append(f"<text x='{(left + width - right) / 2:.0f}' y='{height - 4}' text-anchor='middle' "
                 "font-size='11'>optimizer step</text>")
    for k, (name, color, s) in enumerate(series):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{path}'>"
                     f"<title>{name}</title></polyline>")
        if len(s) <= 60:
            parts += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{color}'/>" for x, y in s]
        parts.append(f"<text x='{width - right - 6}' y='{top + 14 + 14 * k}' text-anchor='end' font-size='11' "
                     f"fill='{color}'>{name}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scores(rec: dict, keys: Sequence[str]) -> str:
    bits = [f"{html.escape(_LABELS.get(k, k))} {_fmt(k, rec.get(k))}" for k in keys if k in rec]
    bits.append(f"{rec.get('answer_tokens', 0)} tokens" + ("" if rec.get("stopped") else ", hit the limit"))
    return "<div class='scores'>" + " · ".join(bits) + "</div>"


def _samples_table(samples: Sequence[dict], score_keys: Sequence[str], compare: bool) -> str:
    main = score_keys[0]
    head = ["<th data-sort='index' data-type='num'>#</th>", "<th>prompt</th>", "<th>reference</th>"]
    if compare:
        head.append("<th data-sort='base' data-type='num'>base answer</th>")
    head.append("<th data-sort='tuned' data-type='num'>tuned answer</th>")
    if compare:
        head.append("<th data-sort='verdict' data-type='text'>tuned is</th>")
    rows = []
    for s in samples:
        verdict = s.get("verdict", "")
        attrs = (f"data-index='{s['index']}' data-tuned='{s['tuned'].get(main, 0):.6f}' "
                 f"data-verdict='{verdict or ('correct' if s['tuned'].get('exact_match') else 'incorrect')}'")
        if compare:
            attrs += f" data-base='{s['base'].get(main, 0):.6f}'"
        cells = [f"<td>{s['index']}</td>", f"<td><pre>{html.escape(s['prompt'])}</pre></td>",
                 f"<td><pre>{html.escape(s['reference'])}</pre></td>"]
        if compare:
            cells.append(f"<td><pre>{html.escape(s['base']['answer'])}</pre>{_scores(s['base'], score_keys)}</td>")
        cells.append(f"<td><pre>{html.escape(s['tuned']['answer'])}</pre>{_scores(s['tuned'], score_keys)}</td>")
        if compare:
            cells.append(f"<td class='v-{verdict}'>{verdict}</td>")
        rows.append(f"<tr class='sample' {attrs}>{''.join(cells)}</tr>")
    return (f"<table id='samples'><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _history_table(history: dict) -> str:
    if not history["steps"]:
        return ""
    steps = history["steps"]
    prompts = {p["index"]: p for p in history["prompts"]}
    indices = [g["index"] for g in steps[-1][1]]
    head = "<tr><th>prompt / reference</th>" + "".join(f"<th>step {s}</th>" for s, _ in steps) + "</tr>"
    rows = []
    for i in indices:
        p = prompts.get(i, {})
        cells = [f"<td><pre>{html.escape(p.get('prompt', str(i)))}</pre><div class='scores'>reference: "
                 f"{html.escape(p.get('reference', ''))}</div></td>"]
        for _, gens in steps:
            g = next((g for g in gens if g["index"] == i), None)
            if g is None:
                cells.append("<td></td>")
                continue
            ok = " class='ok'" if g.get("exact_match") else ""
            cells.append(f"<td{ok}><pre>{html.escape(g['answer'])}</pre></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return ("<h2>Answers during training</h2><p>Greedy answers to the fixed eval prompts of "
            "<code>training_config.eval_generate</code>, at each evaluation (green: exact match).</p>"
            f"<div class='wide'><table id='history'>{head}{''.join(rows)}</table></div>")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
th[data-sort]{cursor:pointer;background:#f4f4f4} th[data-sort]:after{content:" \\2195";color:#999}
#metrics td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37} .down{color:#c62828}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:13px/1.35 ui-monospace,monospace;max-width:380px}
.scores{color:#666;font-size:12px;margin-top:4px}
.v-better{background:#e6f4ea} .v-worse{background:#fdecea} .v-same{background:#f4f4f4}
td.ok{background:#e6f4ea} .wide{overflow-x:auto}
.filters button{margin-right:6px;padding:3px 10px;border:1px solid #bbb;background:#fff;border-radius:4px;
  cursor:pointer}
.filters button.on{background:#222;color:#fff}
.note{background:#fff8e1;padding:6px 10px;border-left:3px solid #f9a825}
"""

_JS = """
(function(){
  var table=document.getElementById('samples'); if(!table){document.body.dataset.ready='1';return;}
  var body=table.tBodies[0], buttons=document.querySelectorAll('.filters button');
  function apply(which){
    var shown=0;
    Array.prototype.forEach.call(body.rows,function(r){
      var on=(which==='all'||r.dataset.verdict===which); r.hidden=!on; if(on)shown++;});
    Array.prototype.forEach.call(buttons,function(b){b.classList.toggle('on',b.dataset.filter===which);});
    document.getElementById('shown').textContent=shown;
    document.body.dataset.filter=which;
  }
  Array.prototype.forEach.call(buttons,function(b){b.addEventListener('click',function(){
    history.replaceState(null,'','#filter='+b.dataset.filter); apply(b.dataset.filter);});});
  var dir={};
  Array.prototype.forEach.call(table.querySelectorAll('th[data-sort]'),function(th){
    th.addEventListener('click',function(){
      var key=th.dataset.sort, num=th.dataset.type==='num'; dir[key]=-(dir[key]||-1);
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=a.dataset[key],y=b.dataset[key];
        if(num){x=parseFloat(x);y=parseFloat(y);} return (x<y?-1:x>y?1:0)*dir[key];});
      rows.forEach(function(r){body.appendChild(r);});
      document.body.dataset.sorted=key;});});
  var m=/filter=(\\w+)/.exec(location.hash); apply(m?m[1]:'all');
  document.body.dataset.ready='1';
})();
"""


def write_report(path: str | Path, summary: dict, samples: Sequence[dict], *, train_records: Sequence[dict] = (),
                 title: str = "") -> Path:
    """The self-contained HTML report (see the module docstring); returns its path."""
    path = Path(path)
    compare = "base" in summary
    primary = summary.get("settings", {}).get("primary_scores") or ["exact_match", "rouge_l"]
    score_keys = [k for k in primary if k not in ("exact_match", "rouge_l")] + ["exact_match", "token_f1",
                                                                                   "rouge_l"]
    settings = summary.get("settings", {})
    how = ("greedy" if settings.get("greedy", True) else
           f"sampled (temperature {settings.get('temperature')}, top-p {settings.get('top_p')})")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>phitune eval: "
             f"{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Generation eval{': ' + html.escape(title) if title else ''}</h1>",
             f"<p>{summary['samples']} held-out conversations answered ({how}, at most "
             f"{settings.get('max_new_tokens')} new tokens); the prompt is every turn before the last assistant "
             "turn, rendered as in training, and the answer is compared with that turn.</p>"]
    if summary.get("interrupted"):
        parts.append(f"<p class='note'>Interrupted: {summary['samples']} of {summary.get('prompts')} prompts were "
                     "answered before Ctrl-C.</p>")
    if summary.get("skipped"):
        reasons = "; ".join(f"{n} {html.escape(r)}" for r, n in summary["skipped_by_reason"].items())
        parts.append(f"<p class='note'>Skipped {summary['skipped']}: {reasons}.</p>")
    parts.append("<h2>Metrics</h2>" + _metrics_table(summary))
    if summary.get("sampled"):
        parts.append(_sampled_paragraph(summary["sampled"]))
    if compare:
        v = summary.get("verdicts", {})
        parts.append(f"<p>Per sample, the tuned answer is better in {v.get('better', 0)}, worse in "
                     f"{v.get('worse', 0)} and the same in {v.get('same', 0)} (compared on "
                     f"{', '.join(_LABELS.get(k, k) for k in primary)}, in that order).</p>")
    curve = loss_curve_svg(train_records)
    if curve:
        parts.append("<h2>Loss curve</h2>" + curve)
    parts.append(_history_table(read_generation_history(train_records)))
    parts.append("<h2>Samples</h2>")
    if compare:
        names = [("all", "all"), ("better", "tuned better"), ("worse", "tuned worse"), ("same", "same")]
    else:
        names = [("all", "all"), ("correct", "exact match"), ("incorrect", "no exact match")]
    parts.append("<div class='filters'>" + "".join(
        f"<button type='button' data-filter='{k}'>{label}</button>" for k, label in names) +
        f" <span><span id='shown'>{len(samples)}</span> shown; click a column header to sort</span></div>")
    parts.append(_samples_table(samples, score_keys, compare))
    parts.append("<script type='application/json' id='summary'>" + dump_json(summary).replace("</", "<\\/") +
                 "</script>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return write_text(path, "".join(parts), "the eval report", fix=_FIX)


def read_summary(report_html: str) -> dict:
    """The summary embedded in a report's ``<script id='summary'>`` (for tests and tools)."""
    start = report_html.index("<script type='application/json' id='summary'>")
    start = report_html.index(">", start) + 1
    end = report_html.index("</script>", start)
    return json.loads(report_html[start:end].replace("<\\/", "</"))
