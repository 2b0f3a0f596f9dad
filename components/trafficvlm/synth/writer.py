"""Writing: lay a planned dataset out on disk exactly as WTS does (see /work/shared/wts-format.md).

`synthesize` plans the scenes (`scene.py`), renders every video (`render.py`) and writes captions,
environment and phase VQA, bbox files, the multi-view csv, and `synth_ground_truth.json` (outside the
WTS layout, so readers never see it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from trafficvlm.synth import render
from trafficvlm.synth.scene import (ENV_QUESTIONS, PHASE_NAMES, PHASE_QUESTIONS, POSITION, Question, Scene,
                                    Timeline, plan_dataset)

CSV_NAME = "view_used_as_main_reference_for_multiview_scenario.csv"
GROUND_TRUTH = "synth_ground_truth.json"
BDD = Path("external/BDD_PC_5K")
OUR_PATHS = ("videos", "annotations", "external", CSV_NAME, GROUND_TRUTH)


@dataclass
class SynthSummary:
    """What `synthesize` wrote."""

    root: Path
    scenes: dict[str, int]          # "<kind>/<split>" -> number of scenarios
    videos: int
    json_files: int
    ground_truth: Path
    video_paths: list[Path] = field(default_factory=list)


@dataclass
class _Video:
    """One video to render: where, which scene, which view (overhead camera index or dash-cam)."""

    path: Path
    scene: Scene
    camera: int | None              # None: dash-cam (vehicle view / BDD)


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _seconds(value: float) -> str:
    """WTS writes times as strings of seconds."""
    return f"{value:.3f}"


def mcq(question: Question, answer: str) -> dict[str, str]:
    """One question in WTS form: the text, options under keys a, b, ..., and the correct letter."""
    entry = {"question": question.text}
    entry.update({letter: option for letter, option in zip("abcd", question.options)})
    entry["correct"] = "abcd"[question.options.index(answer)]
    return entry


# --- where each file goes ------------------------------------------------------------------------------

def _scene_rel(scene: Scene) -> Path:
    """`<split>/<S>` or `<split>/normal_trimmed/<N>`: the part shared by videos/ and annotations/."""
    base = Path(scene.split) / ("normal_trimmed" if scene.kind == "normal" else "")
    return base / scene.sid


def _videos(root: Path, scene: Scene) -> list[_Video]:
    if scene.kind == "bdd":
        return [_Video(root / BDD / "videos" / scene.split / f"{scene.sid}.mp4", scene, None)]
    base = root / "videos" / _scene_rel(scene)
    out = [_Video(base / "overhead_view" / f"{stem}.mp4", scene, k) for k, stem in enumerate(scene.cameras)]
    if scene.has_vehicle_view:
        out.append(_Video(base / "vehicle_view" / f"{scene.sid}_vehicle_view.mp4", scene, None))
    return out


# --- annotation content --------------------------------------------------------------------------------

def _where(scene: Scene, phase: int) -> str:
    state = scene.phases[phase]
    if not state.visible:
        return "is not visible from the vehicle"
    return "is " + POSITION.options[("front", "left", "right").index(state.position)].lower()


def _captions(scene: Scene, phase: int) -> tuple[str, str]:
    env, state = scene.env, scene.phases[phase]
    ped = f"The pedestrian wears {env['upper_color'].lower()} clothes on the upper body and {_where(scene, phase)}."
    veh = (f"The vehicle is {'going straight' if state.moving else 'stopped'} on a road with "
           f"{env['lanes'].lower()} ({env['formation'].lower()}). The weather is {env['weather'].lower()}, "
           f"the scene is {env['brightness'].lower()} and the road surface is {env['surface'].lower()}.")
    return ped, veh


def _phase_entries(scene: Scene, tl: Timeline, view: str, label: Callable[[int], Any],
                   caption: bool) -> list[dict]:
    """Per-phase caption or VQA entries. Captions are written last phase first: WTS files are not sorted."""
    order = range(4, -1, -1) if caption else range(5)
    entries = []
    for p in order:
        start, end = (_seconds(v) for v in tl.phase_span(p, view))
        if caption:
            ped, veh = _captions(scene, p)
            entries.append({"labels": [label(p)], "caption_pedestrian": ped, "caption_vehicle": veh,
                            "start_time": start, "end_time": end})
        else:
            answers = scene.phases[p].answers()
            conversations = [mcq(q, answers[q.key]) for q in PHASE_QUESTIONS if q.key in answers]
            entries.append({"start_time": start, "end_time": end, "labels": [label(p)],
                            "conversations": conversations})
    return entries


def _video_key(scene: Scene, view: str) -> dict[str, Any]:
    """How a file names its video(s): overhead list, vehicle-view string, or BDD's `videos` list."""
    if scene.kind == "bdd":
        return {"videos": [f"{scene.sid}.mp4"]}
    if view == "vehicle":
        return {"vehicle_view": f"{scene.sid}_vehicle_view.mp4"}
    return {"overhead_videos": [f"{stem}.mp4" for stem in scene.cameras]}


def _annotation_files(scene: Scene, tl: Timeline) -> dict[Path, Any]:
    """Relative path -> JSON content of every caption and VQA file of one scene."""
    env = [{"id": scene.number, **_video_key(scene, "overhead"),
            "environment": [mcq(q, scene.env[q.key]) for q in ENV_QUESTIONS]}]
    number, name = (lambda p: str(p)), (lambda p: PHASE_NAMES[p])
    if scene.kind == "bdd":
        vqa = Path("vqa") / scene.split / scene.sid
        caption = {"id": scene.number, "video_name": f"{scene.sid}.mp4", "fps": f"{tl.fps:.3f}",
                   "event_phase": _phase_entries(scene, tl, "vehicle",
                                                 name if scene.split == "train" else number, True)}
        return {BDD / "annotations" / vqa / "environment" / f"{scene.sid}.json": env,
                BDD / "annotations" / vqa / "overhead_view" / f"{scene.sid}.json":
                    [{"id": scene.number, **_video_key(scene, "vehicle"),
                      "event_phase": _phase_entries(scene, tl, "vehicle", name, False)}],
                BDD / "annotations" / "caption" / scene.split / f"{scene.sid}_caption.json": caption}
    rel = _scene_rel(scene)
    files: dict[Path, Any] = {Path("annotations/vqa") / rel / "environment" / f"{scene.sid}.json": env}
    views = [("overhead", "overhead_view")] + ([("vehicle", "vehicle_view")] if scene.has_vehicle_view else [])
    for view, folder in views:
        ident = {} if view == "vehicle" else {"id": scene.number}   # vehicle-view captions often lack an id
        files[Path("annotations/caption") / rel / folder / f"{scene.sid}_caption.json"] = {
            **ident, **_video_key(scene, view), "event_phase": _phase_entries(scene, tl, view, number, True)}
        files[Path("annotations/vqa") / rel / folder / f"{scene.sid}.json"] = [{
            "id": scene.number, **_video_key(scene, view),
            "event_phase": _phase_entries(scene, tl, view, name, False)}]
    return files


# --- bounding boxes ------------------------------------------------------------------------------------

def _coco(box: render.Box, c: render.Canvas) -> list[float]:
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[2], float(c.width)), min(box[3], float(c.height))
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _boxes(scene: Scene, tl: Timeline, c: render.Canvas, view: str, locate: Callable,
           generated: bool) -> list[dict]:
    """One human box per phase (its first frame); `generated` adds tracked boxes on the other frames."""
    out = []
    for p in range(5):
        start, end = tl.phase_span(p, view)
        first = math.ceil(start * tl.fps - 1e-9)
        last = min(math.ceil(end * tl.fps - 1e-9), tl.n_frames) if generated else first + 1
        for frame in range(first, min(last, tl.n_frames)):
            box = locate(scene, tl, c, frame / tl.fps)
            if box is None:
                continue
            out.append({"image_id": frame, "bbox": _coco(box, c), "auto-generated": frame != first,
                        "phase_number": p if scene.kind == "bdd" else str(p)})
    return out


def _bbox_files(video: _Video, tl: Timeline, c: render.Canvas) -> dict[Path, Any]:
    """Relative path -> content of the annotated and generated bbox files of one video."""
    scene, stem = video.scene, video.path.stem
    if video.camera == 3:
        return {}   # WTS has videos without bbox files; the fourth camera stands in for them
    overhead = video.camera is not None
    targets = {"pedestrian": render.overhead_pedestrian_box if overhead else render.dashcam_pedestrian_box}
    if overhead:
        targets["vehicle"] = render.ego_box
    view = "overhead" if overhead else "vehicle"
    files = {}
    for kind in ("bbox_annotated", "bbox_generated"):
        for target, locate in targets.items():
            content = {"annotations": _boxes(scene, tl, c, view, locate, kind == "bbox_generated")}
            if scene.kind == "bdd":
                files[BDD / "annotations" / kind / scene.split / f"{stem}_bbox.json"] = content
            else:
                folder = "overhead_view" if overhead else "vehicle_view"
                files[Path("annotations") / kind / target / _scene_rel(scene) / folder / f"{stem}_bbox.json"] = content
    return files


# --- the csv and the ground truth ----------------------------------------------------------------------

def _view_csv(scenes: list[Scene]) -> str:
    """Scene,Viewpoint1..Viewpoint4: each main scenario's overhead videos, main reference first."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Scene", "Viewpoint1", "Viewpoint2", "Viewpoint3", "Viewpoint4"])
    for scene in scenes:
        if scene.kind == "main":
            names = [f"{stem}.mp4" for stem in scene.cameras]
            writer.writerow([scene.sid] + names + [""] * (4 - len(names)))
    return buf.getvalue()


def _ground_truth(scenes: list[Scene], tl: Timeline, c: render.Canvas, seed: int) -> dict[str, Any]:
    questions = {q.key: {"question": q.text, "options": list(q.options)} for q in ENV_QUESTIONS + PHASE_QUESTIONS}
    return {
        "generator": "trafficvlm synth", "seed": seed, "size": [c.width, c.height], "fps": tl.fps,
        "duration": tl.duration, "questions": questions,
        "scenes": [{
            "scene": s.sid, "id": s.number, "kind": s.kind, "split": s.split, "cameras": s.cameras,
            "vehicle_view": s.has_vehicle_view, "environment": s.env,
            "phases": [{"phase": p, "name": PHASE_NAMES[p], "visible": st.visible,
                        "position": st.position if st.visible else None, "moving": st.moving,
                        "answers": st.answers(),
                        "overhead_span": [round(v, 3) for v in tl.phase_span(p, "overhead")],
                        "vehicle_span": [round(v, 3) for v in tl.phase_span(p, "vehicle")]}
                       for p, st in enumerate(s.phases)],
        } for s in scenes],
    }


# --- rendering ---------------------------------------------------------------------------------------

def _render(video: _Video, tl: Timeline, canvas: render.Canvas) -> Path:
    """Draw and encode one video. Everything it depends on travels in its arguments (the scene carries its
    own seed), so the bytes are the same in any process and in any order."""
    frames = (render.overhead_frames(video.scene, tl, canvas, video.camera) if video.camera is not None
              else render.dashcam_frames(video.scene, tl, canvas))
    render.encode_mp4(video.path, frames, fps=tl.fps, size=(canvas.width, canvas.height))
    return video.path


def _render_all(videos: list[_Video], tl: Timeline, canvas: render.Canvas, *, workers: int,
                progress: bool) -> None:
    """Render every video, serially or in a process pool (1080p x264 is ~1.5 min per 75 s video per core)."""
    bar = tqdm(total=len(videos), desc="synth videos", unit="video", disable=not progress)
    with bar:
        if workers == 1:
            for video in videos:
                _render(video, tl, canvas)
                bar.update(1)
            return
        with ProcessPoolExecutor(min(workers, len(videos) or 1)) as pool:
            futures = {pool.submit(_render, video, tl, canvas): video for video in videos}
            for future in as_completed(futures):
                try:
                    future.result()
                except Exception as exc:
                    pool.shutdown(cancel_futures=True)
                    raise RuntimeError(f"synth: rendering {futures[future].path} failed: {exc}") from exc
                bar.update(1)


def default_workers() -> int:
    """The CPUs this process may use (the container's limit, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- the entry point -----------------------------------------------------------------------------------

def _check(size: tuple[int, int], fps: float, duration: float, counts: dict[str, int], val_fraction: float) -> None:
    """Reject settings the encoder or the phase layout cannot honour, naming the option."""
    width, height = size
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ValueError(f"--size {width}x{height}: width and height must be even and at least 32 (H.264 yuv420p)")
    if fps <= 0 or duration <= 0:
        raise ValueError(f"--fps {fps} / --duration {duration}: both must be positive")
    if round(fps * duration) < 6:
        raise ValueError(f"--fps {fps} x --duration {duration} gives {round(fps * duration)} frames; "
                         "at least 6 are needed so each of the five phases holds a frame")
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"--{name} {n}: must be zero or more")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")


def _prepare_root(root: Path) -> None:
    """Use an empty (or new) directory, or clear the pieces of an earlier synth run in it.

    Refusing other non-empty directories keeps a typo from mixing synthetic files into a real dataset.
    """
    if root.exists() and any(root.iterdir()):
        if not (root / GROUND_TRUTH).is_file():
            raise ValueError(f"{root}: not empty and not an earlier synth output ({GROUND_TRUTH} missing); "
                             "choose an empty or new directory")
        for name in OUR_PATHS:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    root.mkdir(parents=True, exist_ok=True)


def synthesize(out_dir: str | Path, *, seed: int = 0, scenarios: int = 24, normal: int = 4, bdd: int = 4,
               size: tuple[int, int] = (160, 96), fps: float = 4.0, duration: float = 8.0,
               val_fraction: float = 0.25, progress: bool = True, workers: int = 1) -> SynthSummary:
    """Render a synthetic dataset in the WTS layout under `out_dir`; same arguments, same bytes.

    `workers` > 1 renders videos in that many processes; the bytes do not change (see `_render`)."""
    _check(size, fps, duration, {"scenarios": scenarios, "normal": normal, "bdd": bdd}, val_fraction)
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    root = Path(out_dir)
    _prepare_root(root)
    tl, canvas = Timeline(fps=fps, duration=duration), render.Canvas(*size)
    scenes = plan_dataset(seed=seed, scenarios=scenarios, normal=normal, bdd=bdd, val_fraction=val_fraction)
    files: dict[Path, Any] = {}
    videos: list[_Video] = []
    for scene in scenes:
        files.update(_annotation_files(scene, tl))
        for video in _videos(root, scene):
            videos.append(video)
            files.update(_bbox_files(video, tl, canvas))
    for rel, content in files.items():
        _dump(root / rel, content)
    (root / CSV_NAME).write_text(_view_csv(scenes), encoding="utf-8")
    _dump(root / GROUND_TRUTH, _ground_truth(scenes, tl, canvas, seed))
    _render_all(videos, tl, canvas, workers=workers, progress=progress)
    counts: dict[str, int] = {}
    for scene in scenes:
        counts[f"{scene.kind}/{scene.split}"] = counts.get(f"{scene.kind}/{scene.split}", 0) + 1
    return SynthSummary(root=root, scenes=counts, videos=len(videos), json_files=len(files),
                        ground_truth=root / GROUND_TRUTH, video_paths=[v.path for v in videos])
