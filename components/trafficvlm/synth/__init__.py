"""Synthetic traffic scenes in the WTS layout, for tests, the local demo and GPU benchmarks.

    trafficvlm synth data/wts --seed 0                                  # the small CPU default
    trafficvlm synth data/wts-big --size 1920x1080 --fps 30 --duration 75 --scenarios 8

    from trafficvlm.synth import synthesize
    summary = synthesize("data/wts", seed=0, scenarios=24)

Every question's answer is fixed first (`scene.py`, balanced per question across scenarios) and then
drawn as a large, high-contrast cue that survives downsizing to 56x56 (`render.py`); `writer.py` writes
the WTS files. `synth_ground_truth.json` at the root records every answer. What answers what:

| question (key)        | overhead camera                                   | dash-cam (vehicle view, BDD)          |
|-----------------------|---------------------------------------------------|---------------------------------------|
| weather               | top 25% sky band: Clear = plain blue; Cloudy = grey with white blobs; Rainy = dark slate with dense diagonal streaks; Snowy = pale with big white flakes | top 32% sky band, same textures |
| brightness            | ground below the sky scaled x1.0 / x0.62 / x0.36 (Bright / Dim / Dark); the sky is not scaled | same |
| surface               | road colour: Dry = grey, Wet = strong blue tint    | same                                  |
| lanes                 | road width (0.14 W per lane) and 0 / 1 / 2 white lane stripes | same, in perspective         |
| formation             | vertical road; right curve bends right at the top; intersection = horizontal crossing band at 44-60% height; with signal = a big white signal housing with a lit red light left of the road | crossing band at 42-50%; signal housing right of the road |
| sidewalk              | tan strips along the left / right road edges (none for "Not both sides") | same, in perspective |
| street_lights         | tall yellow poles with lamp heads at both image edges (drawn unscaled: they shine) | same  |
| guardrail             | a black-and-white striped barrier along the bottom 4.5% of the frame | just above the dashboard |
| traffic               | 1 / 3 / 6 cyan cars on the far road below the sky (Light / Moderate / Heavy) | near the horizon |
| upper_color           | the pedestrian: skin head, a big block of that pure colour, bare legs; unscaled | same, larger |
| visible (per phase)   | not visible: pedestrian right behind (below) the vehicle, out of its view | pedestrian drawn or not |
| position (per phase)  | pedestrian above (front), left or right of the orange vehicle | at 50% / 20% / 80% of the width |
| vehicle_action        | moving: the vehicle drives up 3.5% of the height per phase, brake bar dark; stopped: still, brake bar bright red | moving: lane dashes scroll, dashboard light green; stopped: still, light red |

Per-phase states hold for the whole phase span given in the VQA file (phases abut, never overlap).
"""

__all__ = ["SynthSummary", "synthesize"]


def __getattr__(name: str):
    # Lazy, so `trafficvlm --help` (which imports synth.cli) does not load numpy and PyAV.
    if name in __all__:
        from trafficvlm.synth import writer
        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
