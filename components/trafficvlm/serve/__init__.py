"""`trafficvlm serve`: a checkpoint bundle behind an OpenAI-compatible API (app.py), its model wrapper on
the eval stage's scoring path (engine.py), request media handling (media.py) and a client (client.py)."""
