"""`trafficvlm prepare`: a WTS-layout dataset -> LLaVA MCQ JSON per subset and split, plus a validation report.

    trafficvlm prepare data/wts --out data/llava                       # environment MCQ, train + val
    trafficvlm prepare data/wts --out data/llava --subsets environment,overhead,vehicle,bdd --strict

From Python (the KFP component shell, the demo):

    from trafficvlm.stages.prepare import run_prepare
    report = run_prepare("data/wts", "data/llava", subsets=("environment", "overhead"))
    print(report.summary()); assert report.ok

Outputs in OUT: `<subset>_mcq_llava_<split>.json` (the recipe's `environment_mcq_llava_{train,val}.json` for
`environment`) and `prepare_report.json`. Each file's `video` paths are relative to its media dir, which the
report lists: `WTS_ROOT/videos/<split>` for environment/overhead/vehicle, `WTS_ROOT/external/BDD_PC_5K/
videos/<split>` for bdd — that is the `--media-dir` to pass to train and eval.

Every video is checked once (it exists; with --check-videos its first frame decodes), in a thread pool.
Bad items are skipped and reported (path relative to WTS_ROOT, reason, what was skipped); `--strict` turns
any problem into a failure (exit 1, and no LLaVA file is written). Notes are normal WTS quirks (a scenario
without an environment file or a vehicle view, a phase ending a little after its video) and never fail a run.
Same input, same flags -> byte-identical outputs (sorted walk, no timestamps).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from trafficvlm.records import VideoQARecord, write_json_atomic, write_llava
from trafficvlm.sources import wts
from trafficvlm.sources.wts import Issue

REPORT_NAME = "prepare_report.json"
PHASE_OVERRUN_NOTE_S = 1.0  # a phase may end this much after its video without a note (rounding in WTS)


def output_name(subset: str, split: str) -> str:
    return f"{subset}_mcq_llava_{split}.json"


@dataclass
class OutputFile:
    subset: str
    split: str
    path: str        # relative to the output directory
    media_dir: str   # relative to the WTS root: what `video` paths in this file are relative to
    samples: int


@dataclass
class PrepareReport:
    wts_root: str
    subsets: list[str]
    splits: list[str]
    strict: bool
    check_videos: bool
    counts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # split -> subset -> counts
    outputs: list[OutputFile] = field(default_factory=list)
    problems: list[Issue] = field(default_factory=list)
    notes: list[Issue] = field(default_factory=list)
    written: bool = False  # the LLaVA files were written (not in a failed strict run)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["ok"] = self.ok
        body["problem_kinds"] = dict(sorted(Counter(p.kind for p in self.problems).items()))
        body["note_kinds"] = dict(sorted(Counter(n.kind for n in self.notes).items()))
        return body

    def summary(self, max_lines: int = 20) -> str:
        lines = [f"prepare {self.wts_root}"]
        for out in self.outputs:
            c = self.counts[out.split][out.subset]
            lines.append(f"  {out.split:5} {out.subset:11} {c['samples']:6} samples, {c['videos']:4} videos, "
                         f"{len(c['questions']):3} question texts {'->' if self.written else 'not written:'} {out.path} "
                         f"(media dir {out.media_dir})")
        for title, issues in (("notes", self.notes), ("problems", self.problems)):
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(Counter(i.kind for i in issues).items()))
            lines.append(f"  {title}: {len(issues)}" + (f" ({kinds})" if issues else ""))
        lines += [f"    {p}" for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"    ... {len(self.problems) - max_lines} more in {REPORT_NAME}")
        return "\n".join(lines)


class PrepareError(RuntimeError):
    """Strict mode found problems. `.report` holds them; the report file was written."""

    def __init__(self, report: PrepareReport, report_path: Path):
        self.report = report
        self.report_path = report_path
        first = report.problems[0]
        super().__init__(f"{len(report.problems)} problem(s) in {report.wts_root} (strict mode; first: {first}); "
                         f"see {report_path}")


# --- the stage ------------------------------------------------------------------------------------------

def run_prepare(wts_root: str | Path, out_dir: str | Path, *, subsets: Iterable[str] = ("environment",),
                splits: Iterable[str] = ("train", "val"), strict: bool = False, check_videos: bool = True,
                workers: int = 4, probe_timeout_s: float = 60.0) -> PrepareReport:
    """Convert, validate, write the LLaVA files and `prepare_report.json`; raise PrepareError if strict and
    anything was wrong (the report is written either way, the LLaVA files only when they are to be used)."""
    root, out_dir = Path(wts_root), Path(out_dir)
    subsets, splits = _check_names(subsets, wts.SUBSETS, "subset"), _check_names(splits, wts.SPLITS, "split")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: WTS root is not a directory")
    report = PrepareReport(str(root), subsets, splits, strict, check_videos)
    sources = {(sub, split): wts.read_subset(root, sub, split) for split in splits for sub in subsets}
    for result in sources.values():
        report.problems += result.problems
        report.notes += result.notes
    videos = _check_all_videos(root, sources, check_videos, workers, probe_timeout_s)
    kept = {key: _keep_usable(result.records, key[0], key[1], videos, report) for key, result in sources.items()}
    for (sub, split), records in kept.items():
        report.counts.setdefault(split, {})[sub] = _counts(records, sub)
        report.outputs.append(OutputFile(sub, split, output_name(sub, split), wts.media_dir(sub, split),
                                         len(records)))
    report_path = out_dir / REPORT_NAME
    if strict and not report.ok:
        write_json_atomic(report_path, report.to_json())
        raise PrepareError(report, report_path)
    for out in report.outputs:
        write_llava(out_dir / out.path, kept[(out.subset, out.split)])
    report.written = True
    write_json_atomic(report_path, report.to_json())
    return report


def _check_names(names: Iterable[str], known: tuple[str, ...], what: str) -> list[str]:
    names = list(dict.fromkeys(names))  # drop repeats, keep order
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


@dataclass
class _VideoCheck:
    """What we know of one video file: an error (kind, reason), or its duration when probed."""

    error: tuple[str, str] | None = None
    duration: float | None = None


def _check_all_videos(root: Path, sources: dict, check_videos: bool, workers: int,
                      timeout_s: float) -> dict[str, _VideoCheck]:
    """One check per distinct video path (relative to root), however many questions refer to it."""
    paths = sorted({f"{wts.media_dir(sub, split)}/{rec.video}"
                    for (sub, split), result in sources.items() for rec in result.records})
    checks = {p: _VideoCheck() if (root / p).is_file() else _VideoCheck(("missing-video", "video file not found"))
              for p in paths}
    to_probe = [p for p, c in checks.items() if c.error is None] if check_videos else []
    if not to_probe:
        return checks
    from tqdm import tqdm

    from trafficvlm import video  # PyAV: imported only when videos are decoded

    def probe(rel: str) -> _VideoCheck:
        try:
            return _VideoCheck(duration=video.probe(root / rel, timeout_s=timeout_s).duration)
        except video.VideoError as exc:
            return _VideoCheck(("bad-video", f"undecodable video ({exc.reason})"))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PyAV releases the GIL while decoding
        futures = {pool.submit(probe, p): p for p in to_probe}
        for future in tqdm(as_completed(futures), total=len(futures), desc="probing videos", unit="video",
                           disable=None):
            checks[futures[future]] = future.result()
    return checks


def _keep_usable(records: list[VideoQARecord], subset: str, split: str, videos: dict[str, _VideoCheck],
                 report: PrepareReport) -> list[VideoQARecord]:
    """Drop records whose video is bad or whose phase starts after the video, and repeated ids; report each
    group of dropped records once (per video, per phase, per pair of files)."""
    dropped: dict[tuple[str, str, str], list[VideoQARecord]] = defaultdict(list)
    overruns: dict[tuple[str, str], str] = {}
    first_source: dict[str, str] = {}
    kept = []
    for rec in records:
        check, source = videos[f"{wts.media_dir(subset, split)}/{rec.video}"], rec.meta.get("source", "?")
        why = _drop_reason(rec, subset, split, check, first_source.get(rec.id))
        if why:
            dropped[why].append(rec)
            continue
        if check.duration is not None and (rec.video_end or 0.0) > check.duration + PHASE_OVERRUN_NOTE_S:
            overruns[(source, f"{rec.video} {rec.phase}")] = (
                f"phase {rec.phase} ends at {rec.video_end:g} s, after the end of {rec.video} "
                f"({check.duration:.3f} s); the clip is cut at the end")
        first_source[rec.id] = source
        kept.append(rec)
    for (kind, path, reason), recs in dropped.items():
        example = f" e.g. {recs[0].id!r}" if kind == "duplicate-id" else ""
        report.problems.append(Issue(kind, path, reason, f"{len(recs)} {subset}/{split} sample"
                                                         f"{'s' * (len(recs) != 1)}{example}"))
    report.notes += [Issue("phase-past-video-end", path, reason) for (path, _), reason in overruns.items()]
    return kept


def _drop_reason(rec: VideoQARecord, subset: str, split: str, check: _VideoCheck,
                 id_used_by: str | None) -> tuple[str, str, str] | None:
    """(kind, path, reason) of the problem that drops this record, or None to keep it."""
    source = rec.meta.get("source", "?")
    if check.error:
        kind, reason = check.error
        return kind, f"{wts.media_dir(subset, split)}/{rec.video}", f"{reason} (used by {source})"
    if check.duration is not None and rec.video_start is not None and rec.video_start >= check.duration:
        return "bad-time", source, (f"phase {rec.phase} starts at {rec.video_start:g} s, after the end of "
                                    f"{rec.video} ({check.duration:.3f} s)")
    if id_used_by is not None:
        return "duplicate-id", source, f"id already used by an entry from {id_used_by}"
    return None


def _counts(records: list[VideoQARecord], subset: str) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "samples": len(records),
        "videos": len({r.video for r in records}),
        "questions": dict(sorted(Counter(r.question for r in records).items())),
    }
    if subset != "environment":
        counts["phases"] = {p: sum(r.phase == p for r in records) for p in wts.PHASES}
    return counts


# --- CLI ------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  trafficvlm prepare data/wts --out data/llava
      environment MCQ for train and val: data/llava/environment_mcq_llava_{train,val}.json
      (videos relative to data/wts/videos/<split>), and data/llava/prepare_report.json
  trafficvlm prepare data/wts --out data/llava --subsets environment,overhead,vehicle,bdd --workers 8
      also per-phase clips: {overhead,vehicle,bdd}_mcq_llava_<split>.json with video_start/video_end
      (bdd videos are relative to data/wts/external/BDD_PC_5K/videos/<split>)
  trafficvlm prepare data/wts --out data/llava --splits val --strict
      fail (exit 1) on any problem: missing/undecodable video, bad JSON, answer not among the options, ...

A scenario without an environment file or a vehicle view is a note, not a problem (normal in WTS).
"""


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare", help="WTS -> LLaVA MCQ JSON + validation report",
        description="Convert a WTS-layout dataset to LLaVA multiple-choice JSON (the reference recipe's format) "
                    "and validate it: every video checked once, every bad item reported by file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wts_root", metavar="WTS_ROOT", type=Path, help="the unzipped dataset (videos/, annotations/)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the JSON files go")
    p.add_argument("--subsets", type=_csv, default=["environment"],
                   help=f"comma-separated, from {','.join(wts.SUBSETS)} (default: environment)")
    p.add_argument("--splits", type=_csv, default=["train", "val"], help="comma-separated (default: train,val)")
    p.add_argument("--strict", action="store_true", help="any problem fails the run (exit 1)")
    p.add_argument("--check-videos", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the first frame of every video (default: on; existence is always checked)")
    p.add_argument("--workers", type=int, default=4, help="parallel video probes (default: 4)")
    p.add_argument("--probe-timeout", type=float, default=60.0, metavar="S", help="per video (default: 60)")
    p.set_defaults(func=_main)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _main(args: argparse.Namespace) -> int:
    try:
        report = run_prepare(args.wts_root, args.out, subsets=args.subsets, splits=args.splits,
                             strict=args.strict, check_videos=args.check_videos, workers=args.workers,
                             probe_timeout_s=args.probe_timeout)
    except PrepareError as exc:
        print(exc.report.summary())
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"  report: {args.out / REPORT_NAME}")
    return 0
