"""The Kubeflow pipeline of trafficvlm: `trafficvlm.py` (the DAG), `components.py` (one lightweight component
per stage), `cluster.py` (kfp-kubernetes settings), `images.py` (stage -> image), `compiled/` (the IR YAML
to upload in the Kubeflow UI; `trafficvlm pipeline compile` writes it)."""
