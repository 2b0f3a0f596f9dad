"""Drawing: turn a `Scene` into RGB frames (overhead camera or dash-cam) and encode them as H.264 MP4.

Colours are chosen so that no object shares a clothing colour (red, green, blue, yellow) or the sidewalk's
tan: a tiny model trained from scratch otherwise learns the colour of whatever sits next to the pedestrian
(measured in bench/demo_sweep.py, docs/demo.md). All geometry is in fractions of the frame, so the same scene renders at 64x48 or 1920x1080. Each cue is
big and high-contrast so it survives downsizing to 56x56; see the table in `trafficvlm.synth` for which
region answers which question. Static parts (ground, road, lights) are drawn once per video with
vectorised numpy; per frame only the sky texture, the vehicle and the pedestrian change.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trafficvlm.synth.scene import Scene, Timeline

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]          # x0, y0, x1, y1 in pixels

BRIGHTNESS = {"Bright": 1.0, "Dim": 0.62, "Dark": 0.36}
SKY = {"Clear": (80, 160, 250), "Cloudy": (150, 150, 155), "Rainy": (55, 60, 85), "Snowy": (190, 195, 210)}
SKY_TEXTURE = {"Cloudy": (210, 210, 215), "Rainy": (170, 180, 225), "Snowy": (255, 255, 255)}
ROAD = {"Dry": (120, 120, 120), "Wet": (50, 75, 140)}
UPPER = {"Red": (235, 0, 0), "Green": (0, 235, 0), "Blue": (0, 0, 255), "Yellow": (255, 255, 0)}
LANES = {"One lane": 1, "Two lanes": 2, "Three lanes": 3}
TRAFFIC = {"Light": 1, "Moderate": 3, "Heavy": 6}
GRASS, STRIPE, SIDEWALK = (60, 130, 50), (245, 245, 245), (215, 175, 120)
LAMP, POLE = (250, 250, 250), (160, 160, 160)      # white lamps: no clothing colour
SIGNAL_BOX, SIGNAL_RED, SIGNAL_GREEN = (240, 240, 240), (255, 0, 0), (0, 70, 0)
CAR, EGO, WINDSHIELD, SKIN = (0, 200, 210), (255, 0, 255), (20, 20, 40), (230, 190, 150)
LEGS = (40, 40, 60)        # dark trousers: bare legs read as the sidewalk's tan
BRAKE_ON, BRAKE_OFF = (255, 255, 255), (90, 25, 10)
DASHBOARD, GO, STOP = (35, 35, 35), (0, 220, 0), (230, 0, 0)


@dataclass(frozen=True)
class Canvas:
    """Frame size plus fraction-to-pixel conversion."""

    width: int
    height: int

    def box(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        return x0 * self.width, y0 * self.height, x1 * self.width, y1 * self.height


def fill(img: np.ndarray, box: Box, color: RGB) -> None:
    """Paint a pixel box (clipped to the frame)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    img[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = color


def sky_texture(scene: Scene, width: int, height: int) -> np.ndarray:
    """A sky band twice as wide/tall as needed (it is rolled per frame to animate rain and snow)."""
    rng = np.random.default_rng(scene.seed)
    weather = scene.env["weather"]
    band = np.empty((height, width, 3), np.uint8)
    band[:] = SKY[weather]
    y, x = np.mgrid[0:height, 0:width]
    if weather == "Cloudy":      # a few big soft-edged blobs
        mask = np.zeros((height, width), bool)
        for cx, cy, r in zip(rng.uniform(0, width, 4), rng.uniform(0, height, 4), rng.uniform(0.1, 0.2, 4)):
            mask |= ((x - cx) / (r * width)) ** 2 + ((y - cy) / (0.5 * height)) ** 2 < 1
    elif weather == "Rainy":     # dense diagonal streaks
        step = max(4, width // 40)
        mask = (x + 2 * y) % step < max(1, step // 3)
    elif weather == "Snowy":     # big white flakes: an s x s square in about half of the 2s x 2s cells
        s = max(2, round(0.02 * width))
        cells = rng.random((height // (2 * s) + 1, width // (2 * s) + 1)) < 0.5
        mask = cells[y // (2 * s), x // (2 * s)] & (y % (2 * s) < s) & (x % (2 * s) < s)
    else:
        return band
    band[mask] = SKY_TEXTURE[weather]
    return band


def animated_sky(texture: np.ndarray, weather: str, frame: int) -> np.ndarray:
    if weather == "Rainy":
        return np.roll(texture, (2 * frame, -frame), axis=(0, 1))
    if weather == "Snowy":
        return np.roll(texture, frame, axis=0)
    return texture


def pedestrian(img: np.ndarray, box: Box, scene: Scene) -> None:
    """A head, a big block of the upper-clothing colour, and bare legs (no second colour to confuse)."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    fill(img, (x0 + 0.2 * (x1 - x0), y0, x1 - 0.2 * (x1 - x0), y0 + 0.18 * h), SKIN)
    fill(img, (x0, y0 + 0.18 * h, x1, y0 + 0.72 * h), UPPER[scene.env["upper_color"]])
    fill(img, (x0 + 0.1 * (x1 - x0), y0 + 0.72 * h, x1 - 0.1 * (x1 - x0), y1), LEGS)


# Six car slots across the frame; the middle is left free because the pedestrian can walk there.
TRAFFIC_SLOTS = (0.03, 0.165, 0.30, 0.57, 0.705, 0.84)


def traffic_slots(scene: Scene) -> list[float]:
    """Left edges (fractions) of the traffic cars: seeded places, count from the traffic volume."""
    rng = np.random.default_rng(scene.seed + 1)
    chosen = rng.choice(len(TRAFFIC_SLOTS), TRAFFIC[scene.env["traffic"]], replace=False)
    return [TRAFFIC_SLOTS[i] for i in sorted(chosen.tolist())]


def _scale(img: np.ndarray, factor: float) -> np.ndarray:
    return (img.astype(np.float32) * factor).round().clip(0, 255).astype(np.uint8)


def _noise(img: np.ndarray, seed: int) -> np.ndarray:
    """A little static sensor noise, different per camera, so cameras of one scene are distinct videos."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-5, 6, img.shape, dtype=np.int16)
    return (img.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)


# --- overhead camera -----------------------------------------------------------------------------------

SKY_BOTTOM, FAR_ROAD, ROAD_TOP, CROSS, BEND = 0.25, (0.27, 0.36), 0.37, (0.44, 0.60), 0.62
LANE_W, STRIPE_W, SIDEWALK_W, CURVE = 0.14, 0.05, 0.14, 0.3
EGO_W, EGO_H, EGO_BOTTOM, STEP = 0.1, 0.16, 0.765, 0.035
PED_W, PED_H, GAP = 0.2, 0.28, 0.02


def _overhead_ground(scene: Scene, c: Canvas) -> np.ndarray:
    """The brightness-scaled ground: grass, far road, the road with lanes and sidewalks, a crossing."""
    w, h = c.width, c.height
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GRASS
    road = ROAD[scene.env["surface"]]
    fill(img, c.box(0, FAR_ROAD[0] - 0.02, 1, FAR_ROAD[1] + 0.01), road)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    bend = np.clip((BEND * h - y) / ((BEND - ROAD_TOP) * h), 0, 1) ** 2
    center = 0.5 * w + (CURVE * w * bend if scene.env["formation"].startswith("Single road (right") else 0)
    lanes = LANES[scene.env["lanes"]]
    half, dx = lanes * LANE_W * w / 2, x - center
    below = y >= ROAD_TOP * h
    side = scene.env["sidewalk"]
    if side in ("Both sides", "Only on the left"):
        img[below & (dx < -half) & (dx >= -half - SIDEWALK_W * w)] = SIDEWALK
    if side in ("Both sides", "Only on the right"):
        img[below & (dx >= half) & (dx < half + SIDEWALK_W * w)] = SIDEWALK
    img[below & (np.abs(dx) < half)] = road
    for j in range(1, lanes):
        img[below & (np.abs(dx + half - j * LANE_W * w) < STRIPE_W * w / 2)] = STRIPE
    if scene.env["formation"].startswith("Intersection"):
        fill(img, c.box(0, CROSS[0], 1, CROSS[1]), road)
    return _scale(img, BRIGHTNESS[scene.env["brightness"]])


def guardrail(scene: Scene, img: np.ndarray, c: Canvas, y0: float, y1: float) -> None:
    """A black-and-white striped barrier across the near edge of the picture (unscaled: reflective)."""
    if scene.env["guardrail"] != "Yes":
        return
    fill(img, c.box(0, y0, 1, y1), (15, 15, 15))
    for k in range(10):
        fill(img, c.box(0.1 * k, y0, 0.1 * k + 0.05, y1), (245, 245, 245))


def _lit_objects(scene: Scene, img: np.ndarray, c: Canvas, lights: Box, signal: Box, cars_y: tuple) -> None:
    """Things drawn at full brightness (they shine or are lit): street lights, signal, traffic cars."""
    if scene.env["street_lights"] == "Yes":
        x0, y0, x1, y1 = lights
        for left, right, head_to in ((x0, x1, x1 + 0.04), (1 - x1, 1 - x0, 1 - x1 - 0.04)):
            fill(img, c.box(left, y0 + 0.05, right, y1), POLE)
            fill(img, c.box(min(left, head_to), y0, max(right, head_to), y0 + 0.07), LAMP)
    if scene.env["formation"] == "Intersection (with signal)":
        x0, y0, x1, y1 = signal
        # A white housing with a lit red light over an unlit green one: large and bright even at night.
        fill(img, c.box(x0, y0, x1, y1), SIGNAL_BOX)
        fill(img, c.box(x0 + 0.02, y0 + 0.03, x1 - 0.02, y0 + 0.45 * (y1 - y0)), SIGNAL_RED)
        fill(img, c.box(x0 + 0.02, y0 + 0.55 * (y1 - y0), x1 - 0.02, y1 - 0.03), SIGNAL_GREEN)
    for left in traffic_slots(scene):
        fill(img, c.box(left, cars_y[0], left + 0.08, cars_y[1]), CAR)


def ego_box(scene: Scene, tl: Timeline, c: Canvas, t: float) -> Box:
    """The vehicle (overhead): it drives up the road by STEP of the frame height per moving phase."""
    bottom = EGO_BOTTOM - STEP * tl.travelled(t, scene.phases, "overhead")
    return c.box(0.5 - EGO_W / 2, bottom - EGO_H, 0.5 + EGO_W / 2, bottom)


def overhead_pedestrian_box(scene: Scene, tl: Timeline, c: Canvas, t: float) -> Box:
    """The pedestrian (overhead): in front of / left of / right of the vehicle, or behind it while it is
    out of the vehicle's field of view (the overhead camera still sees it, so its clothes always show)."""
    state = scene.phases[tl.phase_at(t, "overhead")]
    x0, y0, x1, y1 = ego_box(scene, tl, c, t)
    pw, ph, gx, gy = PED_W * c.width, PED_H * c.height, GAP * c.width, GAP * c.height
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if not state.visible:
        return cx - pw / 2, y1 + gy, cx + pw / 2, y1 + gy + ph
    if state.position == "front":
        return cx - pw / 2, y0 - gy - ph, cx + pw / 2, y0 - gy
    if state.position == "left":
        return x0 - gx - pw, cy - ph / 2, x0 - gx, cy + ph / 2
    return x1 + gx, cy - ph / 2, x1 + gx + pw, cy + ph / 2


def overhead_frames(scene: Scene, tl: Timeline, c: Canvas, camera: int) -> Iterator[np.ndarray]:
    """Frames of one overhead camera: the scene seen from above, the sky band on top."""
    static = _noise(_overhead_ground(scene, c), scene.seed + 7919 * (camera + 1))
    _lit_objects(scene, static, c, lights=(0.02, 0.38, 0.05, 0.97), signal=(0.07, 0.44, 0.19, 0.72),
                 cars_y=FAR_ROAD)
    guardrail(scene, static, c, 0.955, 1.0)
    sky_h = int(round(SKY_BOTTOM * c.height))
    texture = sky_texture(scene, c.width, sky_h)
    for i in range(tl.n_frames):
        t = i / tl.fps
        img = static.copy()
        img[:sky_h] = animated_sky(texture, scene.env["weather"], i)
        box = ego_box(scene, tl, c, t)
        moving = scene.phases[tl.phase_at(t, "overhead")].moving
        x0, y0, x1, y1 = box
        fill(img, box, EGO)
        fill(img, (x0, y0 + 0.1 * (y1 - y0), x1, y0 + 0.35 * (y1 - y0)), WINDSHIELD)
        fill(img, (x0, y1 - 0.22 * (y1 - y0), x1, y1), BRAKE_OFF if moving else BRAKE_ON)
        pedestrian(img, overhead_pedestrian_box(scene, tl, c, t), scene)
        yield img


# --- dash-cam (vehicle view and BDD) -----------------------------------------------------------------

HORIZON, DASH, DASH_CROSS = 0.32, 0.88, (0.42, 0.50)
PED_X = {"front": 0.5, "left": 0.2, "right": 0.8}


def _dashcam_ground(scene: Scene, c: Canvas) -> tuple[np.ndarray, np.ndarray]:
    """The brightness-scaled ground in perspective, and the mask of the lane stripes (dashed per frame)."""
    w, h = c.width, c.height
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GRASS
    road = ROAD[scene.env["surface"]]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = np.clip((y - HORIZON * h) / ((DASH - HORIZON) * h), 0, 1)     # 0 at the horizon, 1 near
    curve = 0.3 * w * (1 - depth) ** 2 if scene.env["formation"].startswith("Single road (right") else 0
    lanes = LANES[scene.env["lanes"]]
    lane_w = (0.03 + 0.22 * depth) * w
    half, dx, below = lanes * lane_w / 2, x - 0.5 * w - curve, y >= HORIZON * h
    walk = (0.03 + 0.12 * depth) * w
    side = scene.env["sidewalk"]
    if side in ("Both sides", "Only on the left"):
        img[below & (dx < -half) & (dx >= -half - walk)] = SIDEWALK
    if side in ("Both sides", "Only on the right"):
        img[below & (dx >= half) & (dx < half + walk)] = SIDEWALK
    img[below & (np.abs(dx) < half)] = road
    stripes = np.zeros((h, w), bool)
    for j in range(1, lanes):
        stripes |= below & (np.abs(dx + half - j * lane_w) < (0.004 + 0.025 * depth) * w)
    if scene.env["formation"].startswith("Intersection"):
        fill(img, c.box(0, DASH_CROSS[0], 1, DASH_CROSS[1]), road)
        stripes &= ~((y >= DASH_CROSS[0] * h) & (y < DASH_CROSS[1] * h))
    return _scale(img, BRIGHTNESS[scene.env["brightness"]]), stripes


def dashcam_pedestrian_box(scene: Scene, tl: Timeline, c: Canvas, t: float) -> Box | None:
    state = scene.phases[tl.phase_at(t, "vehicle")]
    if not state.visible:
        return None
    x = PED_X[state.position]
    return c.box(x - 0.045, 0.46, x + 0.045, 0.82)


def dashcam_frames(scene: Scene, tl: Timeline, c: Canvas) -> Iterator[np.ndarray]:
    """Frames of the ego dash-cam: sky, road ahead, the pedestrian, and a dashboard with a go/stop light."""
    ground, stripes = _dashcam_ground(scene, c)
    static = _noise(ground, scene.seed + 104729)
    _lit_objects(scene, static, c, lights=(0.03, 0.34, 0.055, 0.86), signal=(0.85, 0.42, 0.94, 0.70),
                 cars_y=(0.33, 0.40))
    fill(static, c.box(0, DASH, 1, 1), DASHBOARD)
    guardrail(scene, static, c, 0.83, DASH)
    sky_h = int(round(HORIZON * c.height))
    texture = sky_texture(scene, c.width, sky_h)
    white = np.array(STRIPE, np.float32) * BRIGHTNESS[scene.env["brightness"]]
    period = max(4, round(0.1 * c.height))
    rows = np.arange(c.height)
    for i in range(tl.n_frames):
        t = i / tl.fps
        img = static.copy()
        img[:sky_h] = animated_sky(texture, scene.env["weather"], i)
        # Dashes scroll towards the camera while the vehicle moves and stand still while it is stopped.
        offset = int(tl.travelled(t, scene.phases, "vehicle") * 0.6 * c.height)
        dashes = ((rows - offset) // (period // 2)) % 2 == 0
        img[stripes & dashes[:, None]] = white.round().astype(np.uint8)
        moving = scene.phases[tl.phase_at(t, "vehicle")].moving
        fill(img, c.box(0.40, 0.90, 0.60, 0.98), GO if moving else STOP)
        ped = dashcam_pedestrian_box(scene, tl, c, t)
        if ped:
            pedestrian(img, ped, scene)
        yield img


# --- encoding --------------------------------------------------------------------------------------------

def encode_mp4(path: Path, frames: Iterable[np.ndarray], *, fps: float, size: tuple[int, int]) -> int:
    """Write RGB frames as H.264 (libx264, yuv420p) MP4; returns the number of frames written.

    One encoder thread and fixed options make the output byte-for-byte reproducible for the same frames.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        # Recipe-scale frames (1080p) get the fastest preset: the content is flat colour, quality holds.
        preset = "veryfast" if size[0] * size[1] <= 1280 * 720 else "ultrafast"
        stream.options = {"preset": preset, "crf": "20", "x264-params": "threads=1:sliced-threads=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
            count += 1
        for packet in stream.encode():
            out.mux(packet)
    return count
