"""The 15 WTS-environment-style questions about one clip that the GPU benchmarks score and train on (the
recipe's setting: ~15 questions a video; with the real Qwen BPE each prompt suffix is ~47 tokens)."""

QUESTIONS = [
    ("What is weather in the scenario?", ["Clear", "Cloudy", "Rainy", "Snowy"]),
    ("What is the brightness level in the scene?", ["Bright", "Dim", "Dark"]),
    ("What are road surface conditions?", ["Dry", "Wet"]),
    ("What is the road inclination in the scene?", ["Steep downhill", "Level", "Gentle downhill", "Steep uphill"]),
    ("How many lanes are there?", ["One-way", "Two-way", "Three-way"]),
    ("What is the formation of the road?", ["Single road (right curve)", "Single road (straight line)",
                                            "Intersection (without signal)", "Intersection (with signal)"]),
    ("Where is the sidewalk in the scene?", ["Both sides", "Not both sides", "Only on the left", "Only on the right"]),
    ("Are there street lights in the scene?", ["Yes", "No"]),
    ("What is the volume of the traffic in the scene?", ["Light", "Moderate", "Heavy"]),
    ("What is surface type of the road?", ["Asphalt", "Gravel", "Concrete"]),
    ("What is the type of the road?", ["Main road", "Residential road", "Parking lot"]),
    ("Where is the roadside strip in the scene?", ["Both sides", "Not both sides", "Only on the left",
                                                    "Only on the right"]),
    ("What is the age group of the pedestrian?", ["Child", "Young", "Adult", "Elderly"]),
    ("Is the pedestrian wearing a hat?", ["Yes", "No"]),
    ("Is the pedestrian wearing glasses?", ["Yes", "No"]),
]
