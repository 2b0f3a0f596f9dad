"""Ground truth of a synthetic dataset: which scenarios exist, what each looks like, what happens when.

Everything here is pure data and seeded choices; nothing is drawn. `plan_dataset` fixes every answer
before a pixel exists, and the renderer draws exactly these attributes, so the questions are answerable
from the video alone.

Balance: each attribute is assigned by cycling through its options in a seeded random order of the
scenarios, separately per (split, part), so every split sees every option about equally often and a
model that ignores the pixels scores near chance (1/number of options).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PHASE_NAMES = ("prerecognition", "recognition", "judgement", "action", "avoidance")
PHASE_SPAN = 0.18          # each of the five phases lasts this fraction of the video
OVERHEAD_START = 0.05      # overhead phases start at 5% of the video ...
VEHICLE_START = 0.02       # ... vehicle-view phases at 2%: WTS vehicle times are offset from overhead times


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: `key` names the ground-truth attribute that answers it."""

    key: str
    text: str
    options: tuple[str, ...]


# Real WTS wording (typos included where WTS has them); options are ours where WTS's are not public.
ENV_QUESTIONS = (
    Question("weather", "What is weather in the scenario?", ("Clear", "Cloudy", "Rainy", "Snowy")),
    Question("brightness", "What is the brightness level in the scene?", ("Bright", "Dim", "Dark")),
    Question("surface", "What are road surface conditions?", ("Dry", "Wet")),
    Question("lanes", "How many lanes are there?", ("One lane", "Two lanes", "Three lanes")),
    Question("traffic", "What is the volume of the traffic in the scene?", ("Light", "Moderate", "Heavy")),
    Question("formation", "What is the formation of the road?",
             ("Single road (right curve)", "Single road (straight line)",
              "Intersection (without signal)", "Intersection (with signal)")),
    Question("sidewalk", "Where is the sidewalk in the scene?",
             ("Both sides", "Not both sides", "Only on the left", "Only on the right")),
    Question("street_lights", "Are there street lights in the scene?", ("Yes", "No")),
    Question("guardrail", "Is there guardrail around the road?", ("Yes", "No")),
    # Clothing colours are pure, far-apart hues so they survive blurring into their neighbours at 56x56.
    Question("upper_color", "What is the color of pedestrian's upper body clothing?",
             ("Red", "Green", "Blue", "Yellow")),
)

VISIBLE = Question("visible", "What is vehicle's field of view?",
                   ("Pedestrian is visible", "Pedestrian is not visible"))
POSITION = Question("position", "What is the position of the pedestrian relative to the vehicle?",
                    ("In front of the vehicle", "On the left side of the vehicle", "On the right side of the vehicle"))
VEHICLE_ACTION = Question("vehicle_action", "What is the action taken by vehicle?", ("Going straight", "Stopped"))
# The position question is only asked while the pedestrian is visible (otherwise nothing shows it).
PHASE_QUESTIONS = (VISIBLE, POSITION, VEHICLE_ACTION)


@dataclass
class PhaseState:
    """What holds during one phase: the pedestrian's visibility and place, and whether the car moves."""

    visible: bool
    position: str          # "front" | "left" | "right" (meaningful only when visible)
    moving: bool

    def answers(self) -> dict[str, str]:
        """Answer text per phase question key; `position` only when the pedestrian is visible."""
        out = {"visible": VISIBLE.options[0 if self.visible else 1],
               "vehicle_action": VEHICLE_ACTION.options[0 if self.moving else 1]}
        if self.visible:
            out["position"] = POSITION.options[("front", "left", "right").index(self.position)]
        return out


@dataclass
class Scene:
    """One scenario (main, normal_trimmed or BDD) and everything needed to draw and annotate it."""

    sid: str                       # scenario id (= video stem for normal and BDD)
    kind: str                      # "main" | "normal" | "bdd"
    split: str                     # "train" | "val"
    number: int                    # the numeric "id" field of the JSON files
    env: dict[str, str]            # ENV_QUESTIONS key -> answer text
    phases: list[PhaseState]       # five, in phase order 0..4
    cameras: list[str] = field(default_factory=list)   # overhead video stems (BDD: none)
    has_vehicle_view: bool = False
    seed: int = 0                  # per-scene seed for textures and traffic placement


@dataclass(frozen=True)
class Timeline:
    """Video timing shared by every video of one dataset."""

    fps: float
    duration: float

    @property
    def n_frames(self) -> int:
        return int(round(self.duration * self.fps))

    def phase_span(self, phase: int, view: str) -> tuple[float, float]:
        """(start, end) in seconds of a phase in an overhead or vehicle/BDD video."""
        start = (OVERHEAD_START if view == "overhead" else VEHICLE_START) * self.duration
        length = PHASE_SPAN * self.duration
        return start + phase * length, start + (phase + 1) * length

    def phase_at(self, t: float, view: str) -> int:
        """The phase in force at time t; before the event the first, after it the last."""
        start, _ = self.phase_span(0, view)
        return min(4, max(0, int((t - start) // (PHASE_SPAN * self.duration))))

    def travelled(self, t: float, phases: list[PhaseState], view: str) -> float:
        """How many phase-lengths the vehicle has driven by time t (it moves only in moving phases)."""
        total = 0.0
        for p, state in enumerate(phases):
            start, end = self.phase_span(p, view)
            if state.moving:
                total += min(max((t - start) / (end - start), 0.0), 1.0)
        return total


def _balanced(options: tuple, n: int, rng: random.Random) -> list:
    """n values cycling through `options` (each option within one of the others' count), randomly placed."""
    offset = rng.randrange(len(options))
    values = [options[(i + offset) % len(options)] for i in range(n)]
    rng.shuffle(values)
    return values


def _phases(n_scenes: int, rng: random.Random) -> list[list[PhaseState]]:
    """Five phase states per scene, balanced per question over all (scene, phase) pairs."""
    n = n_scenes * 5
    visible = _balanced((True, False), n, rng)
    moving = _balanced((True, False), n, rng)
    positions = iter(_balanced(("front", "left", "right"), sum(visible), rng))
    states = [PhaseState(v, next(positions) if v else "front", m) for v, m in zip(visible, moving)]
    return [states[i * 5:(i + 1) * 5] for i in range(n_scenes)]


def _env(n_scenes: int, rng: random.Random) -> list[dict[str, str]]:
    columns = {q.key: _balanced(q.options, n_scenes, rng) for q in ENV_QUESTIONS}
    return [{key: values[i] for key, values in columns.items()} for i in range(n_scenes)]


def split_counts(n: int, val_fraction: float) -> tuple[int, int]:
    """(train, val): val gets round(n * fraction), at least one when n >= 2 and fraction > 0."""
    n_val = int(round(n * val_fraction))
    if n >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return n - n_val, n_val


def _main_id(i: int) -> tuple[str, list[str]]:
    """A scenario id and its camera suffixes: July-style `Camera<k>` or Sept/Oct-style IP names alternate."""
    if i % 2 == 0:
        return f"20230707_{i + 1}_SN{10 + i}_T1", [f"Camera{k}" for k in range(1, 5)]
    return f"20230922_{i + 1}_SN{10 + i}_T1", [f"192.168.0.{11 + k}" for k in range(4)]


def plan_dataset(*, seed: int, scenarios: int, normal: int, bdd: int, val_fraction: float) -> list[Scene]:
    """Every scene of the dataset with its balanced attributes, cameras and phase states."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    counters = {"main": 0, "normal": 0, "bdd": 0}
    for kind, total in (("main", scenarios), ("normal", normal), ("bdd", bdd)):
        for split, n in zip(("train", "val"), split_counts(total, val_fraction)):
            envs, phases = _env(n, rng), _phases(n, rng)
            n_cams = _balanced((1, 2, 3, 4), n, rng)
            vehicle = _balanced((True, True, False), n, rng)
            for j in range(n):
                i = counters[kind]
                counters[kind] += 1
                scene = Scene(sid="", kind=kind, split=split, number=100 + len(scenes), env=envs[j],
                              phases=phases[j], seed=rng.randrange(2**31))
                _name(scene, i, n_cams[j], vehicle[j])
                scenes.append(scene)
    return scenes


def _name(scene: Scene, i: int, n_cams: int, vehicle: bool) -> None:
    """Fill in the WTS-style id, overhead video stems and vehicle-view flag of a scene."""
    if scene.kind == "main":
        scene.sid, cams = _main_id(i)
        scene.cameras = [f"{scene.sid}_{cam}_{c}" for c, cam in enumerate(cams[:n_cams])]
        scene.has_vehicle_view = vehicle
    elif scene.kind == "normal":
        # A normal scenario's id is its single overhead video's stem.
        scene.sid = f"20231013_{101813 + 97 * i}_normal_192.168.0.11_1_event_{i + 1}"
        scene.cameras = [scene.sid]
    else:
        scene.sid = f"video{1000 + i}"
