"""The WTS dataset on disk -> `VideoQARecord`s. The only module that knows the WTS layout (wts-format.md).

    from trafficvlm.sources import wts
    result = wts.read_subset("data/wts", "environment", "train")   # records, problems, notes
    print(result.records[0].video, len(result.problems), len(result.notes))

Readers never raise for one bad file: a file that is missing, truncated, of the wrong shape, or holds a
question that cannot be used becomes an `Issue` (path relative to the root, reason, what was skipped) and the
walk goes on. `Issue`s are *problems* (bad data: the caller decides whether that fails the run) or *notes*
(normal WTS quirks: a scenario without an environment file or without a vehicle view).

Environment VQA follows the reference recipe's converter (NVIDIA cosmos-cookbook,
scripts/examples/reason1/intelligent-transportation/data_preprocess.py, `process_wts_environment_mcq`):
walk `annotations/vqa/<split>/`, skip names containing "normal_trimmed", then walk
`annotations/vqa/<split>/normal_trimmed/`; per scenario read `environment/<S>.json`, take its first object,
and emit one sample per (video of `overhead_videos`, environment question) with id `<video stem>_<index of
the question in the file, from 0>`. The recipe walks with `os.listdir` (unspecified order); we walk in sorted
order so outputs are reproducible.

Phase VQA (overhead, vehicle, BDD; the recipe has no converter for these, and BDD's environment files are
not read): one sample per (video, phase, question), clipped to the phase's span, phases in canonical order
(prerecognition .. avoidance), id `<video stem>_<phase>_<index of the question within its phase, from 0>`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trafficvlm.records import VideoQARecord

SUBSETS = ("environment", "overhead", "vehicle", "bdd")
SPLITS = ("train", "val")
NORMAL = "normal_trimmed"
BDD_DIR = "external/BDD_PC_5K"
OPTION_KEYS = "abcd"  # the recipe reads exactly these option keys

# The one phase table: numbers (caption files), names and their spelling variants (VQA files) -> name.
PHASES = ("prerecognition", "recognition", "judgement", "action", "avoidance")
_PHASE_ALIASES = {"pre-recognition": "prerecognition", "pre_recognition": "prerecognition",
                  "precognition": "prerecognition", "judgment": "judgement"}

# Which view folder, which key names the videos, which record type: per phase-VQA subset.
_VIEWS = {"overhead": ("overhead_view", "overhead_videos"), "vehicle": ("vehicle_view", "vehicle_view"),
          "bdd": ("overhead_view", "videos")}


@dataclass(frozen=True)
class Issue:
    """Something found while reading: `path` is relative to the dataset root."""

    kind: str
    path: str
    reason: str
    skipped: str = ""

    def __str__(self) -> str:
        tail = f" [skipped {self.skipped}]" if self.skipped else ""
        return f"{self.path}: {self.reason}{tail}"


@dataclass
class SourceResult:
    records: list[VideoQARecord] = field(default_factory=list)
    problems: list[Issue] = field(default_factory=list)
    notes: list[Issue] = field(default_factory=list)

    def extend(self, other: "SourceResult") -> None:
        self.records += other.records
        self.problems += other.problems
        self.notes += other.notes


@dataclass(frozen=True)
class Scenario:
    """One annotated unit: a WTS scenario, a normal_trimmed event, or a BDD clip."""

    id: str
    split: str
    kind: str  # "main" | "normal" | "bdd"

    @property
    def annotation_dir(self) -> str:
        if self.kind == "bdd":
            return f"{BDD_DIR}/annotations/vqa/{self.split}/{self.id}"
        middle = f"{NORMAL}/" if self.kind == "normal" else ""
        return f"annotations/vqa/{self.split}/{middle}{self.id}"

    def video_rel(self, view: str, name: str) -> str:
        """A video's path relative to its media dir (`media_dir`); BDD videos lie flat."""
        if self.kind == "bdd":
            return name
        prefix = f"{NORMAL}/" if self.kind == "normal" else ""
        return f"{prefix}{self.id}/{view}/{name}"


class BadItem(ValueError):
    """One unusable piece of a file (a question, a phase, a time): readers turn it into a problem Issue."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# --- layout ---------------------------------------------------------------------------------------------

def media_dir(subset: str, split: str) -> str:
    """The directory (relative to the root) that a subset's `video` paths are relative to: `--media-dir`."""
    return f"{BDD_DIR}/videos/{split}" if subset == "bdd" else f"videos/{split}"


def iter_scenarios(root: str | Path, split: str, *, bdd: bool = False) -> Iterator[Scenario]:
    """Scenarios of a split in the reference converter's order (sorted): main, then normal_trimmed; or BDD."""
    root = Path(root)
    if bdd:
        yield from (Scenario(n, split, "bdd") for n in _sorted_dirs(root / BDD_DIR / "annotations/vqa" / split))
        return
    base = root / "annotations/vqa" / split
    yield from (Scenario(n, split, "main") for n in _sorted_dirs(base) if NORMAL not in n)
    yield from (Scenario(n, split, "normal") for n in _sorted_dirs(base / NORMAL))


def _sorted_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def read_json(root: str | Path, rel: str) -> tuple[Any, Issue | None]:
    """(data, None), or (None, problem) for a missing, unreadable or invalid JSON file."""
    try:
        text = (Path(root) / rel).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, Issue("missing-json", rel, "file not found", "the whole file")
    except (OSError, UnicodeDecodeError) as exc:
        return None, Issue("invalid-json", rel, f"cannot read ({exc})", "the whole file")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, Issue("invalid-json", rel, f"not valid JSON ({exc}; truncated?)", "the whole file")


def _vqa_object(data: Any, rel: str, required: tuple[str, ...]) -> tuple[dict | None, list[Issue]]:
    """The first object of a VQA file (an array with one object), checked for `required` keys."""
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        got = type(data).__name__ if not isinstance(data, list) else "an empty array" if not data \
            else f"an array of {type(data[0]).__name__}"
        return None, [Issue("bad-schema", rel, f"expected a JSON array holding one object, got {got}",
                            "the whole file")]
    obj, issues = data[0], []
    missing = [k for k in required if k not in obj]
    if missing:
        return None, [Issue("bad-schema", rel, f"missing key(s) {', '.join(missing)}", "the whole file")]
    if len(data) > 1:  # the recipe reads data[0] only; say so rather than dropping the rest silently
        issues.append(Issue("bad-schema", rel, f"array holds {len(data)} objects; only the first is read",
                            f"{len(data) - 1} objects"))
    return obj, issues


# --- questions, phases, times ---------------------------------------------------------------------------

def parse_question(row: Any) -> tuple[str, dict[str, str], str]:
    """(question, options a..d in letter order, lowercase answer) of one MCQ row; `BadItem` if unusable."""
    if not isinstance(row, dict):
        raise BadItem("bad-question", f"expected an object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadItem("bad-question", "no question text")
    options = {k: row[k] for k in OPTION_KEYS if k in row}
    if any(not isinstance(v, str) for v in options.values()):
        raise BadItem("bad-question", "an option is not a string")
    if list(options) != list(OPTION_KEYS[: len(options)]) or len(options) < 2:
        raise BadItem("bad-question", f"options must be consecutive letters from a (at least two), got "
                                   f"{', '.join(options) or 'none'}")
    correct = row.get("correct")
    answer = correct.strip().lower() if isinstance(correct, str) else None
    if answer not in options:
        raise BadItem("bad-answer", f"correct letter {correct!r} is not among the options {', '.join(options)}")
    return question, options, answer


def normalize_phase(label: Any) -> str:
    """A phase label (number, numeric string, name or known variant) -> canonical name; ValueError else."""
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(PHASES):
        return PHASES[label]
    if isinstance(label, str):
        text = label.strip().lower()
        if text.isdigit() and int(text) < len(PHASES):
            return PHASES[int(text)]
        text = _PHASE_ALIASES.get(text, text)
        if text in PHASES:
            return text
    raise ValueError(f"unknown phase label {label!r}")


def parse_time(value: Any, key: str) -> float:
    """Seconds from a WTS time (a string such as "39.395", or a number); `BadItem` if not a finite time >= 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise BadItem("bad-time", f"{key} {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise BadItem("bad-time", f"{key} {value!r} is not a finite time >= 0")
    return seconds


def _phase_of(entry: dict) -> tuple[str, float, float]:
    labels = entry.get("labels")
    labels = [labels] if isinstance(labels, (str, int)) else labels
    if not isinstance(labels, list) or not labels:
        raise BadItem("unknown-phase", "no phase labels")
    try:
        names = {normalize_phase(label) for label in labels}
    except ValueError as exc:
        raise BadItem("unknown-phase", str(exc)) from None
    if len(names) > 1:
        raise BadItem("unknown-phase", f"labels {labels!r} name different phases")
    start, end = parse_time(entry.get("start_time"), "start_time"), parse_time(entry.get("end_time"), "end_time")
    if end <= start:
        raise BadItem("bad-time", f"end_time {end:g} is not after start_time {start:g}")
    return names.pop(), start, end


def _video_names(obj: dict, key: str) -> list[str]:
    """Video file names under `key` (a list, or vehicle view's single string); `BadItem` on odd names."""
    names = obj.get(key)
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names:
        raise BadItem("bad-schema", f"no videos under {key!r}")
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise BadItem("bad-schema", f"video name {name!r} under {key!r} is not a plain file name")
    return names


def _stem(name: str) -> str:
    # The recipe cuts the last 4 characters (".mp4"); Path.stem would also eat "0.11_1" of an extension-less
    # "<S>_192.168.0.11_1", so cut only a real 3-letter extension.
    return name[:-4] if name[-4:-3] == "." else name


def _load_vqa(root: str | Path, rel: str, out: SourceResult, *, videos_key: str, questions_key: str,
              also_required: tuple[str, ...] = ()) -> tuple[dict, list[str]] | None:
    """A VQA file's object and video names, or None with the reason added to `out.problems`."""
    data, problem = read_json(root, rel)
    obj, issues = (None, [problem]) if problem else _vqa_object(data, rel, (*also_required, videos_key,
                                                                            questions_key))
    out.problems += issues
    if obj is None:
        return None
    try:
        videos = _video_names(obj, videos_key)
        if not isinstance(obj[questions_key], list):
            raise BadItem("bad-schema", f"{questions_key!r} is not a list")
    except BadItem as bad:
        out.problems.append(Issue(bad.kind, rel, bad.reason, "the whole file"))
        return None
    return obj, videos


# --- readers --------------------------------------------------------------------------------------------

def read_environment(root: str | Path, scenario: Scenario) -> SourceResult:
    """Environment MCQs of one scenario, exactly as the reference converter writes them."""
    out = SourceResult()
    rel = f"{scenario.annotation_dir}/environment/{scenario.id}.json"
    if not (Path(root) / rel).exists():  # a WTS quirk, not an error: the recipe prints this and goes on
        out.notes.append(Issue("no-environment-file", rel, "Environment file not found", "the scenario"))
        return out
    loaded = _load_vqa(root, rel, out, videos_key="overhead_videos", questions_key="environment",
                       also_required=("id",))  # the recipe copies "id" into every entry as wts_id
    if loaded is None:
        return out
    obj, videos = loaded
    questions = _parse_rows(obj["environment"], rel, "environment", len(videos), out)
    for name in videos:
        for index, (question, options, answer) in questions:
            out.records.append(VideoQARecord(
                id=f"{_stem(name)}_{index}", video=scenario.video_rel("overhead_view", name), question=question,
                options=options, answer=answer, meta={"wts_id": obj["id"], "source": rel}))
    return out


def _parse_rows(rows: Any, rel: str, where: str, n_videos: int, out: SourceResult) -> list[tuple[int, tuple]]:
    """(index in file, parsed question) for each usable row; a problem for each unusable one."""
    if not isinstance(rows, list):
        out.problems.append(Issue("bad-schema", rel, f"{where}: questions are not a list", where))
        return []
    parsed = []
    for index, row in enumerate(rows):
        try:
            parsed.append((index, parse_question(row)))
        except BadItem as bad:
            samples = f"{n_videos} sample{'s' * (n_videos != 1)}"
            out.problems.append(Issue(bad.kind, rel, f"{where}[{index}]: {bad.reason}", samples))
    return parsed


def read_phase_vqa(root: str | Path, scenario: Scenario, subset: str) -> SourceResult:
    """Phase MCQs of one scenario's overhead or vehicle view (or a BDD clip), one record per
    (video, phase, question), clipped to the phase. A missing view file is a note (normal in WTS)."""
    view, key = _VIEWS[subset]
    out = SourceResult()
    rel = f"{scenario.annotation_dir}/{view}/{scenario.id}.json"
    if not (Path(root) / rel).exists():
        out.notes.append(Issue(f"no-{view.replace('_', '-')}-file", rel, f"no {view} VQA file", "the scenario"))
        return out
    loaded = _load_vqa(root, rel, out, videos_key=key, questions_key="event_phase")
    if loaded is None:
        return out
    obj, videos = loaded
    phases = _parse_phases(obj["event_phase"], rel, len(videos), out)
    meta = {"wts_id": obj["id"]} if "id" in obj else {}
    meta |= {"view": view, "split": scenario.split, "scenario": scenario.id, "source": rel}
    for name in videos:
        for phase, start, end, questions in phases:
            for index, (question, options, answer) in questions:
                out.records.append(VideoQARecord(
                    id=f"{_stem(name)}_{phase}_{index}", video=scenario.video_rel(view, name), question=question,
                    options=options, answer=answer, type=subset, phase=phase, video_start=start, video_end=end,
                    meta=dict(meta)))
    return out


def _parse_phases(entries: list, rel: str, n_videos: int, out: SourceResult) -> list[tuple]:
    """(phase, start, end, questions) per usable phase entry, in canonical phase order. A repeated phase
    would give repeated ids, so only its first entry is kept."""
    seen: dict[str, tuple[int, float, float]] = {}
    for i, entry in enumerate(entries):
        where = f"event_phase[{i}]"
        try:
            if not isinstance(entry, dict):
                raise BadItem("bad-schema", f"expected an object, got {type(entry).__name__}")
            phase, start, end = _phase_of(entry)
            if phase in seen:
                raise BadItem("bad-schema", f"phase {phase!r} already given by event_phase[{seen[phase][0]}]")
        except BadItem as bad:
            out.problems.append(Issue(bad.kind, rel, f"{where}: {bad.reason}", f"the phase ({where})"))
            continue
        seen[phase] = (i, start, end)
    phases = []
    for phase in sorted(seen, key=PHASES.index):
        i, start, end = seen[phase]
        questions = _parse_rows(entries[i].get("conversations"), rel, f"event_phase[{i}].conversations",
                                n_videos, out)
        phases.append((phase, start, end, questions))
    return phases


def read_subset(root: str | Path, subset: str, split: str) -> SourceResult:
    """Every record of one subset and split, with the problems and notes met on the way."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    base = f"{BDD_DIR}/annotations/vqa/{split}" if subset == "bdd" else f"annotations/vqa/{split}"
    out = SourceResult()
    if not (Path(root) / base).is_dir():
        out.problems.append(Issue("missing-split", base, f"no {split} annotations for subset {subset}",
                                  f"{subset}/{split}"))
        return out
    for scenario in iter_scenarios(root, split, bdd=subset == "bdd"):
        if subset == "environment":
            out.extend(read_environment(root, scenario))
        else:
            out.extend(read_phase_vqa(root, scenario, subset))
    return out


VIEW_CSV = "view_used_as_main_reference_for_multiview_scenario.csv"

# --- the layout as object keys (for ingest from S3) ---------------------------------------------------------

# What each subset needs per split, as (glob relative to the dataset root, must match at least one object).
# `ingest` selects objects with it; "bbox" is an ingest-only extra (the boxes are not converted to MCQ).
OBJECT_PATTERNS: dict[str, tuple[tuple[str, bool], ...]] = {
    "environment": (("videos/{split}/**/overhead_view/*.mp4", True),
                    ("annotations/vqa/{split}/**/environment/*.json", True)),
    "overhead": (("videos/{split}/**/overhead_view/*.mp4", True),
                 ("annotations/vqa/{split}/**/overhead_view/*.json", True),
                 ("annotations/caption/{split}/**/overhead_view/*.json", False)),
    "vehicle": (("videos/{split}/**/vehicle_view/*.mp4", True),
                ("annotations/vqa/{split}/**/vehicle_view/*.json", True),
                ("annotations/caption/{split}/**/vehicle_view/*.json", False)),
    "bdd": (("external/BDD_PC_5K/videos/{split}/*.mp4", True),
            ("external/BDD_PC_5K/annotations/vqa/{split}/**/*.json", True),
            ("external/BDD_PC_5K/annotations/caption/{split}/*.json", False)),
    "bbox": (("annotations/bbox_annotated/*/{split}/**/*.json", False),
             ("annotations/bbox_generated/*/{split}/**/*.json", False)),
}


def referenced_videos(key: str, data: Any) -> list[str]:
    """Keys (relative to the prefix) of the videos a VQA file names, or [] for files of other kinds."""
    match = re.fullmatch(r"(external/BDD_PC_5K/)?annotations/vqa/([^/]+)/(.*/)?([^/]+)/[^/]+\.json", key)
    if not match:
        return []
    bdd, split, middle, view = match.group(1), match.group(2), match.group(3) or "", match.group(4)
    names: list[str] = []
    for entry in data if isinstance(data, list) else [data]:
        if isinstance(entry, dict):
            value = entry.get("overhead_videos") or entry.get("videos") or entry.get("vehicle_view") or []
            names += [value] if isinstance(value, str) else [str(v) for v in value]
    if bdd:
        return [f"{bdd}videos/{split}/{name}" for name in names]
    video_view = "vehicle_view" if view == "vehicle_view" else "overhead_view"
    return [f"videos/{split}/{middle}{video_view}/{name}" for name in names]
