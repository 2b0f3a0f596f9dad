"""The container image each pipeline stage runs in.

Every KFP component names its image here (`base_image=STAGE_IMAGES[...]`), and the SFT launcher starts
the PyTorchJob with `STAGE_IMAGES["train"]`. The images are built from `images/` with kfp preinstalled,
which is why the components say `install_kfp_package=False` (air-gapped clusters cannot pip-install).

To use your own registry, retag the images and change REGISTRY, then `trafficvlm pipeline compile`.
"""

from trafficvlm import __version__

REGISTRY = "ghcr.io/trafficvlm"


def image(name: str) -> str:
    """`base` -> `ghcr.io/trafficvlm/base:<package version>` (images are tagged with the package version)."""
    return f"{REGISTRY}/{name}:{__version__}"


# stage -> image. Light stages share `base` (the trafficvlm package, kfp, boto3, PyAV, no CUDA);
# `train` carries CUDA torch for the PyTorchJob pods; eval and quantize have their own heavy stacks.
STAGE_IMAGES: dict[str, str] = {
    "ingest": image("base"),
    "prepare": image("base"),
    "sft": image("base"),        # the launcher pod: creates and follows the PyTorchJob, no GPU
    "train": image("train"),     # the PyTorchJob's pods (torchrun + FSDP2)
    "eval": image("eval"),
    "quantize": image("quantize"),
    "promote": image("base"),    # MLflow registry + the S3 upload of the FP8 checkpoint
    "rollout": image("base"),
    "smoke": image("base"),      # one OpenAI-API request (httpx) with a clip decoded by PyAV
    "tracking": image("base"),   # the pipeline's parent MLflow run: opened first, closed by the exit handler
}
