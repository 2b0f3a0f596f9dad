"""The evaluation results directory, its report, and the statistics that compare two or more runs.

A results directory (what `trafficvlm eval` writes, what `trafficvlm compare` reads):

    predictions.jsonl   one scored question per line (records.Prediction)
    results.json        accuracy overall / per question text / type / phase / view, parse failures, provenance
    report.md, report.html, *.png   accuracy per question, option confusion matrix, reliability diagram

From Python:

    from trafficvlm.report import read_predictions, summarize, write_report, compare_results
    results = summarize(read_predictions("runs/eval/predictions.jsonl"), provenance={})
    gate = compare_results(["runs/eval-base", "runs/eval-sft"], out="runs/compare")
    gate["delta"], gate["ci"], gate["p_value"]      # the first run against the second

Comparisons pair questions by id. Confidence intervals are a cluster bootstrap over videos (the ~15 questions
of one video are not independent); the significance test is McNemar's on the discordant pairs, exact
(binomial) when they are few.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from trafficvlm.records import Prediction, write_json_atomic

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
COMPARE = "compare.json"
NO_ANSWER = "none"          # the confusion-matrix column for unparseable answers
EXACT_MCNEMAR_MAX = 50      # discordant pairs up to this count: exact binomial test; above: chi-square


# --- predictions.jsonl --------------------------------------------------------------------------------------

def read_predictions(path: str | Path) -> list[Prediction]:
    """All predictions of a `predictions.jsonl`. A line cut off by a crash (the last one) is skipped with a
    warning; a damaged line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file")
    lines = path.read_text(encoding="utf-8").splitlines()
    preds = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            preds.append(Prediction(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if n == len(lines):
                print(f"warning: {path}:{n}: ignoring a truncated last line ({exc})")
                continue
            raise ValueError(f"{path}:{n}: not a prediction ({exc})") from None
    return preds


def write_predictions(path: str | Path, preds: Iterable[Prediction]) -> None:
    """Rewrite a predictions file atomically (the final, data-ordered copy)."""
    lines = "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in preds)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(lines, encoding="utf-8")
    tmp.replace(path)


# --- results.json -----------------------------------------------------------------------------------------

def view_of(video: str) -> str:
    """Camera view from a WTS-relative video path: overhead, vehicle, or other (BDD dash-cam clips)."""
    if "/overhead_view/" in f"/{video}":
        return "overhead"
    if "/vehicle_view/" in f"/{video}":
        return "vehicle"
    return "other"


def _tally(preds: list[Prediction], key: Callable[[Prediction], str]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        groups[key(p)].append(p)
    return {k: _score(v) for k, v in sorted(groups.items())}


def _score(preds: list[Prediction]) -> dict[str, Any]:
    correct = sum(p.is_correct for p in preds)
    return {"accuracy": correct / len(preds) if preds else 0.0, "correct": correct, "total": len(preds),
            "parse_failures": sum(p.predicted is None for p in preds)}


def summarize(preds: list[Prediction], provenance: dict[str, Any]) -> dict[str, Any]:
    """results.json content. Unparseable answers count as wrong and are also counted in parse_failures."""
    return {**_score(preds),
            "per_question": _tally(preds, lambda p: p.question),
            "per_type": _tally(preds, lambda p: p.type),
            "per_phase": _tally(preds, lambda p: p.phase),
            "per_view": _tally(preds, lambda p: view_of(p.video)),
            "videos": len({p.video for p in preds}),
            **provenance}


def write_results(out_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(out_dir) / RESULTS
    write_json_atomic(path, results)
    return path


def read_results(results_dir: str | Path) -> tuple[dict[str, Any], list[Prediction]]:
    d = Path(results_dir)
    if not (d / RESULTS).is_file():
        raise FileNotFoundError(f"{d}: no {RESULTS} (not an eval results directory)")
    return json.loads((d / RESULTS).read_text()), read_predictions(d / PREDICTIONS)


# --- plots and the report -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def plot_per_question(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    items = sorted(results["per_question"].items(), key=lambda kv: kv[1]["accuracy"])
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(items) + 1.2))
    ax.barh([_short(q) for q, _ in items], [s["accuracy"] for _, s in items], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(f"Accuracy per question (overall {results['accuracy']:.1%}, n={results['total']})")
    return _save(fig, path)


def confusion(preds: list[Prediction]) -> tuple[list[str], list[str], list[list[int]]]:
    """Rows: correct letter; columns: predicted letter, then `none` for unparseable answers."""
    letters = sorted({l for p in preds for l in p.options})
    cols = letters + [NO_ANSWER]
    counts = Counter((p.correct, p.predicted or NO_ANSWER) for p in preds if p.correct)
    return letters, cols, [[counts[(r, c)] for c in cols] for r in letters]


def plot_confusion(preds: list[Prediction], path: Path) -> Path:
    plt = _pyplot()
    rows, cols, matrix = confusion(preds)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(cols), 1 + 0.6 * len(rows)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), [c.upper() if c != NO_ANSWER else c for c in cols])
    ax.set_yticks(range(len(rows)), [r.upper() for r in rows])
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("correct")
    ax.set_title("Option confusion matrix")
    return _save(fig, path)


def reliability(preds: list[Prediction], bins: int = 10) -> list[dict[str, float]]:
    """Confidence (the chosen option's probability) vs accuracy, in equal-width bins; empty bins omitted."""
    scored = [(max(p.letter_probs.values()), p.is_correct) for p in preds if p.letter_probs]
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, ok) for c, ok in scored if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if inside:
            out.append({"low": lo, "high": hi, "count": len(inside),
                        "confidence": sum(c for c, _ in inside) / len(inside),
                        "accuracy": sum(ok for _, ok in inside) / len(inside)})
    return out


def plot_reliability(preds: list[Prediction], path: Path) -> Path | None:
    table = reliability(preds)
    if not table:  # generate mode / endpoints give no probabilities
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.plot([r["confidence"] for r in table], [r["accuracy"] for r in table], "o-", label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the chosen option)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def write_report(out_dir: str | Path, results: dict[str, Any], preds: list[Prediction]) -> tuple[Path, Path]:
    """report.md and report.html (the HTML embeds the PNGs, so it is one self-contained file)."""
    out = Path(out_dir)
    plots = [plot_per_question(results, out / "accuracy_per_question.png"),
             plot_confusion(preds, out / "confusion_matrix.png"),
             plot_reliability(preds, out / "reliability.png")]
    plots = [p for p in plots if p is not None]
    md = out / "report.md"
    md.write_text(_markdown(results, plots), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(results, plots), encoding="utf-8")
    return md, page


def _table_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    rows = []
    for section in ("per_type", "per_phase", "per_view", "per_question"):
        for name, s in results.get(section, {}).items():
            rows.append((section.removeprefix("per_"), name, s))
    return rows


def _markdown(results: dict[str, Any], plots: list[Path]) -> str:
    lines = [f"# Evaluation: {results.get('model', '?')}", "",
             f"**Accuracy {results['accuracy']:.2%}** ({results['correct']}/{results['total']}, "
             f"{results['videos']} videos, {results['parse_failures']} unparseable answers counted wrong).", "",
             f"Data: `{results.get('data', '?')}`; engine: {results.get('engine', '?')}, "
             f"mode: {results.get('mode', '?')}.", "", *_skipped_lines(results),
             "| group | name | accuracy | correct | total | unparseable |", "|---|---|---|---|---|---|"]
    for group, name, s in _table_rows(results):
        lines.append(f"| {group} | {name} | {s['accuracy']:.1%} | {s['correct']} | {s['total']} | "
                     f"{s['parse_failures']} |")
    lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _skipped_lines(results: dict[str, Any]) -> list[str]:
    """Clips whose video could not be read: not scored, listed so nobody mistakes the total for the dataset."""
    skipped = results.get("skipped") or []
    if not skipped:
        return []
    return ([f"**{results['skipped_questions']} questions skipped** (unreadable videos, not counted):", ""] +
            [f"- `{s['video']}`: {s['reason']}" for s in skipped] + [""])


def _html(results: dict[str, Any], plots: list[Path]) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(g)}</td><td>{e(n)}</td><td>{s['accuracy']:.1%}</td><td>{s['correct']}</td>"
                   f"<td>{s['total']}</td><td>{s['parse_failures']}</td></tr>" for g, n, s in _table_rows(results))
    images = "".join(f'<p><img alt="{e(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"></p>' for p in plots)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>trafficvlm eval</title>"
            f"<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}"
            f"td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head><body>"
            f"<h1>Evaluation: {e(str(results.get('model', '?')))}</h1>"
            f"<p><b>Accuracy {results['accuracy']:.2%}</b> ({results['correct']}/{results['total']}, "
            f"{results['videos']} videos, {results['parse_failures']} unparseable answers counted wrong, "
            f"{results.get('skipped_questions', 0)} questions skipped)</p>"
            f"<table><tr><th>group</th><th>name</th><th>accuracy</th><th>correct</th><th>total</th>"
            f"<th>unparseable</th></tr>{rows}</table>{images}</body></html>\n")


# --- comparing runs -------------------------------------------------------------------------------------------

def mcnemar(right_to_wrong: int, wrong_to_right: int) -> dict[str, Any]:
    """Two-sided McNemar test on the discordant pairs: exact binomial for up to EXACT_MCNEMAR_MAX pairs,
    else chi-square with continuity correction."""
    from scipy import stats

    n = right_to_wrong + wrong_to_right
    if n == 0:
        return {"method": "none (no discordant pairs)", "statistic": 0.0, "p_value": 1.0}
    if n <= EXACT_MCNEMAR_MAX:
        p = stats.binomtest(min(right_to_wrong, wrong_to_right), n, 0.5).pvalue
        return {"method": "exact binomial", "statistic": float(min(right_to_wrong, wrong_to_right)),
                "p_value": float(p)}
    chi2 = (abs(right_to_wrong - wrong_to_right) - 1) ** 2 / n
    return {"method": "chi-square (continuity corrected)", "statistic": chi2, "p_value": float(stats.chi2.sf(chi2, 1))}


def bootstrap_ci(pairs: list[tuple[str, bool, bool]], *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile CIs of accuracy A, accuracy B and B - A, resampling *videos* with replacement (all of a
    video's questions together). `pairs` holds (video, a_correct, b_correct) per question."""
    import numpy as np

    by_video: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # [n, a_correct, b_correct]
    for video, a, b in pairs:
        s = by_video[video]
        s[0], s[1], s[2] = s[0] + 1, s[1] + a, s[2] + b
    sums = np.array(list(by_video.values()), dtype=float)
    rng = np.random.default_rng(seed)
    draws = sums[rng.integers(0, len(sums), size=(n_boot, len(sums)))].sum(axis=1)  # [n_boot, 3]
    acc_a, acc_b = draws[:, 1] / draws[:, 0], draws[:, 2] / draws[:, 0]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"a": np.percentile(acc_a, q).tolist(), "b": np.percentile(acc_b, q).tolist(),
            "delta": np.percentile(acc_b - acc_a, q).tolist()}


def compare_pair(a: list[Prediction], b: list[Prediction], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """B against A on the questions both scored (paired by id)."""
    by_id_a, by_id_b = {p.id: p for p in a}, {p.id: p for p in b}
    common = [i for i in by_id_a if i in by_id_b]
    if not common:
        raise ValueError("the two runs share no question ids: they scored different data")
    pairs = [(by_id_a[i].video, by_id_a[i].is_correct, by_id_b[i].is_correct) for i in common]
    r2w = [i for i in common if by_id_a[i].is_correct and not by_id_b[i].is_correct]
    w2r = [i for i in common if not by_id_a[i].is_correct and by_id_b[i].is_correct]
    acc_a = sum(x for _, x, _ in pairs) / len(pairs)
    acc_b = sum(y for _, _, y in pairs) / len(pairs)
    ci = bootstrap_ci(pairs, n_boot=n_boot, seed=seed)
    test = mcnemar(len(r2w), len(w2r))
    return {"n": len(common), "videos": len({v for v, _, _ in pairs}),
            "only_in_a": len(by_id_a) - len(common), "only_in_b": len(by_id_b) - len(common),
            "accuracy_a": acc_a, "accuracy_b": acc_b, "delta": acc_b - acc_a,
            "ci": ci["delta"], "ci_a": ci["a"], "ci_b": ci["b"], "p_value": test["p_value"], "mcnemar": test,
            "per_question": _per_question_delta(common, by_id_a, by_id_b),
            "flipped": {"right_to_wrong": [_flip(by_id_a[i], by_id_b[i]) for i in r2w],
                        "wrong_to_right": [_flip(by_id_a[i], by_id_b[i]) for i in w2r]}}


def _per_question_delta(ids: list[str], a: dict[str, Prediction], b: dict[str, Prediction]) -> dict[str, Any]:
    groups: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        groups[a[i].question].append(i)
    out = {}
    for question, qids in sorted(groups.items()):
        acc_a = sum(a[i].is_correct for i in qids) / len(qids)
        acc_b = sum(b[i].is_correct for i in qids) / len(qids)
        out[question] = {"n": len(qids), "accuracy_a": acc_a, "accuracy_b": acc_b, "delta": acc_b - acc_a}
    return out


def _flip(a: Prediction, b: Prediction) -> dict[str, Any]:
    return {"id": a.id, "video": a.video, "question": a.question, "correct": a.correct,
            "predicted_a": a.predicted, "predicted_b": b.predicted}


def compare_results(dirs: list[str | Path], out: str | Path | None = None, *, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """Compare each run in `dirs[1:]` against `dirs[0]`. Returns (and with `out`, writes compare.json and
    compare.png) a dict whose top-level `delta`, `ci`, `p_value` are those of dirs[1] vs dirs[0]."""
    if len(dirs) < 2:
        raise ValueError("compare needs at least two results directories")
    runs = [read_results(d) for d in dirs]
    comparisons = []
    for d, (_, preds) in zip(dirs[1:], runs[1:]):
        comparisons.append({"a": str(dirs[0]), "b": str(d), **compare_pair(runs[0][1], preds, n_boot=n_boot,
                                                                             seed=seed)})
    first = comparisons[0]
    result = {"runs": [{"dir": str(d), "model": r.get("model"), "accuracy": r["accuracy"], "total": r["total"]}
                       for d, (r, _) in zip(dirs, runs)],
              "delta": first["delta"], "ci": first["ci"], "p_value": first["p_value"],
              "bootstrap": {"resamples": n_boot, "unit": "video", "seed": seed, "level": 0.95},
              "comparisons": comparisons}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result["chart"] = str(plot_compare(result, [r for r, _ in runs], out / "compare.png"))
        write_json_atomic(out / COMPARE, result)
    return result


def plot_compare(result: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: accuracy per question text (and overall) for every run."""
    import numpy as np

    plt = _pyplot()
    questions = sorted({q for r in results for q in r["per_question"]})
    labels = ["(overall)"] + questions
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) * max(1, len(results) / 2) + 1.5))
    y = np.arange(len(labels))
    for k, (run, r) in enumerate(zip(result["runs"], results)):
        acc = [r["accuracy"]] + [r["per_question"].get(q, {}).get("accuracy", 0.0) for q in questions]
        ax.barh(y + k * width, acc, height=width, label=f"{Path(run['dir']).name} ({r['accuracy']:.1%})")
    ax.set_yticks(y + width * (len(results) - 1) / 2, [_short(l) for l in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"delta {result['delta']:+.1%} (95% CI {result['ci'][0]:+.1%}..{result['ci'][1]:+.1%}), "
                 f"McNemar p={result['p_value']:.3g}")
    return _save(fig, path)


def format_compare(result: dict[str, Any]) -> str:
    """The table `trafficvlm compare` prints."""
    lines = []
    for c in result["comparisons"]:
        lines += [f"{c['a']}  vs  {c['b']}   ({c['n']} paired questions, {c['videos']} videos)",
                  f"  accuracy  {c['accuracy_a']:.2%} -> {c['accuracy_b']:.2%}   delta {c['delta']:+.2%} "
                  f"[95% CI {c['ci'][0]:+.2%}, {c['ci'][1]:+.2%}, videos resampled]",
                  f"  McNemar   {len(c['flipped']['right_to_wrong'])} right->wrong, "
                  f"{len(c['flipped']['wrong_to_right'])} wrong->right, p = {c['p_value']:.3g} "
                  f"({c['mcnemar']['method']})"]
        if c["only_in_a"] or c["only_in_b"]:
            lines.append(f"  unpaired  {c['only_in_a']} questions only in A, {c['only_in_b']} only in B (left out)")
        width = max([len(_short(q, 50)) for q in c["per_question"]] + [8])
        lines.append(f"  {'question':<{width}}  {'n':>5}  {'A':>7}  {'B':>7}  {'delta':>7}")
        for q, s in c["per_question"].items():
            lines.append(f"  {_short(q, 50):<{width}}  {s['n']:>5}  {s['accuracy_a']:>7.1%}  "
                         f"{s['accuracy_b']:>7.1%}  {s['delta']:>+7.1%}")
        lines.append("")
    return "\n".join(lines)
