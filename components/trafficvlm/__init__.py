"""trafficvlm: post-train video-language models on traffic scenes, as a Kubeflow pipeline."""
__version__ = "0.1.0"
