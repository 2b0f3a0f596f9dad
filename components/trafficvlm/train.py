"""The SFT recipe: read it top to bottom. One process, or N under torchrun; CPU or GPU; same code.

    trafficvlm train --config configs/sft/tiny_cpu.toml                      # CPU, minutes
    torchrun --nproc-per-node 8 -m trafficvlm train --config configs/sft/recipe_setting_a.toml \\
        model.path=/models/Cosmos-Reason1-7B train.output_dir=/pvc/runs/a
    trafficvlm train --config configs/sft/tiny_cpu.toml --resume            # continue the last checkpoint

    from trafficvlm.train import train
    result = train(load_train_config("configs/sft/tiny_cpu.toml"))

Steps: inputs (made when the config says so) -> model (freeze policy or LoRA) -> FSDP2 -> optimizer and
warmup+decay schedule -> data in a seeded, resumable order -> loop of `train_step` (gradient accumulation,
loss only where labels are, clipping) with progress, metrics and checkpoints -> `final/` bundle.

With `train.shared_prefix = true` the unit of data is a video: its prefix (system prompt + video) is
encoded once and each question is a branch under a block mask (data.shared_prefix_batch); the gradient
is the sum of the per-question gradients (tests/test_train.py checks it).

Loss normalisation: every optimizer step's loss is the sum of token losses over the whole global batch
(all ranks, all micro-batches) divided by its number of label tokens, so 1 GPU and N GPUs at the same
global batch compute the same loss and gradient.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trafficvlm import checkpoint, tracking
from trafficvlm.config import TrainConfig, save_config
from trafficvlm.data import IGNORE_INDEX, BatchPlan, SFTDataset, VideoGroupDataset, collate_fn, collate_shared, make_loader
from trafficvlm.parallel import DistInfo, all_reduce_sum, barrier, close_distributed, init_distributed, shard_model
from trafficvlm.watchdog import StallWatchdog

# Dense bf16 peak by GPU name (substring match), for MFU. None on CPU or an unknown card.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "B200": 2250e12}


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str
    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


# --- inputs -----------------------------------------------------------------------------------------------

def ensure_inputs(cfg: TrainConfig) -> None:
    """Make the tiny model / synthetic data the config asks for, when missing (rank 0 only)."""
    model_dir = Path(cfg.model.path)
    if not model_dir.exists() and cfg.model.build_tiny:
        from trafficvlm.model import build_tiny

        print(f"model {model_dir} is missing: building a tiny random Qwen2.5-VL there")
        build_tiny(model_dir, spec=cfg.video, prompt=cfg.prompt)
    ann = Path(cfg.data.annotation_path)
    if not ann.exists() and cfg.data.synth_root:
        from trafficvlm.stages.prepare import run_prepare
        from trafficvlm.synth import synthesize

        root = Path(cfg.data.synth_root)
        if not root.exists():
            print(f"data {ann} is missing: synthesizing a WTS-layout dataset at {root}")
            synthesize(root, seed=cfg.train.seed, scenarios=cfg.data.synth_scenarios, progress=False)
        run_prepare(root, ann.parent, subsets=("environment",), check_videos=False)
    if not ann.is_file():
        raise FileNotFoundError(f"data.annotation_path {ann}: no such LLaVA JSON file")


def load_records(cfg: TrainConfig):
    from trafficvlm.records import read_llava

    records = [r for r in read_llava(cfg.data.annotation_path) if r.answer]
    if not records:
        raise ValueError(f"{cfg.data.annotation_path}: no records with an answer to train on")
    return records[:cfg.data.limit] if cfg.data.limit else records


# --- model ------------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, device: torch.device):
    """Master weights in train.master_dtype (fp32 by default; FSDP computes in bf16 on GPU), loaded straight
    onto this rank's device (sharding then frees all but its shard), then `prepare_model`."""
    from trafficvlm.model import load_model

    if cfg.model.random_init:
        return prepare_model(random_model(cfg, device), cfg)
    model = load_model(cfg.model.path, dtype=master_dtype(cfg), device=str(device),
                       attn_implementation=cfg.model.attn_implementation)
    return prepare_model(model, cfg)


def master_dtype(cfg: TrainConfig) -> torch.dtype:
    return getattr(torch, cfg.train.master_dtype)


def random_model(cfg: TrainConfig, device: torch.device):
    """`model.random_init = "7b" | "tiny"`: that architecture with random weights in train.master_dtype, built
    on this rank's device (every rank the same, from the seed), with the vision attention `load_model` gives
    it on GPU."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from trafficvlm.model import config_7b, config_tiny

    config = {"7b": config_7b, "tiny": config_tiny}[cfg.model.random_init]()
    config._attn_implementation = cfg.model.attn_implementation
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=master_dtype(cfg))
    if device.type == "cuda":
        from trafficvlm.fast_vision import enable_fast_vision

        enable_fast_vision(model)
    return model


def prepare_model(model, cfg: TrainConfig):
    """Freeze policy for full mode; LoRA on the LLM's linear layers for LoRA mode (vision tower and merger
    frozen). Returns (model, peft LoraConfig kwargs or None, parameter counts)."""
    from trafficvlm.model import apply_freeze

    if cfg.train.mode == "full":
        counts = apply_freeze(model, vision=cfg.train.freeze_vision, merger=cfg.train.freeze_merger,
                              llm=cfg.train.freeze_llm, embeddings=cfg.train.freeze_embeddings)
        return model, None, counts
    from peft import LoraConfig, get_peft_model

    # A regex, so the vision tower's own gate/up/down projections stay untouched.
    names = "|".join(cfg.lora.target_modules)
    lora = dict(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=rf"model\.language_model\..*\.({names})")
    model = get_peft_model(model, LoraConfig(**lora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, lora, {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def wrap_model(model, cfg: TrainConfig, info: DistInfo):
    """Compile a frozen vision tower (it only runs forward), then checkpoint / compile / FSDP2-shard
    (`parallel.shard_model`). In place; returns `model`."""
    if cfg.train.compile_vision and vision_frozen(cfg) and info.device.type == "cuda":
        from trafficvlm.fast_vision import compile_vision_blocks

        compile_vision_blocks(model)
    # One rank: the "shard" is the whole fp32 weight, so resharding after forward saves nothing and makes
    # backward gather (copy + cast to bf16) every block a second time.
    return shard_model(model, info, block_classes=block_classes(model), checkpointing=cfg.train.grad_checkpointing,
                       compile=cfg.train.compile, reshard_after_forward=info.world_size > 1)


def vision_frozen(cfg: TrainConfig) -> bool:
    return cfg.train.mode == "lora" or cfg.train.freeze_vision


def block_classes(model) -> list[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base._no_split_modules)


def build_optimizer(model, cfg: TrainConfig, total_steps: int, use_cuda: bool):
    """AdamW (no weight decay on biases and norms) and a warmup + cosine/linear/constant schedule.

    train.master_dtype float32: torch's fused AdamW; bfloat16: torchao's AdamW with stochastic rounding of
    the bf16 weights (its moments follow the weights' dtype)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    t = cfg.train
    if t.master_dtype == "float32":
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), fused=use_cuda or None)
    else:
        from torchao.optim import _AdamW

        opt = _AdamW(groups, lr=t.lr, betas=tuple(t.betas), bf16_stochastic_round=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[t.decay]
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape


# --- one step ---------------------------------------------------------------------------------------------

def forward_loss(model, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over label tokens, and their number. The LM head runs only at positions whose
    next token is labelled (`logits_to_keep`): full logits over thousands of video tokens at a 152k vocab
    would dominate memory and time for nothing. `position_ids` in the batch are our 3-D positions."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "mm_token_type_ids")}
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = out.logits.float() if out.logits.element_size() < 4 else out.logits  # bf16 -> fp32 for the loss
    tgt = targets[:, keep]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((tgt != IGNORE_INDEX).sum())


@dataclass
class StepStats:
    loss: float        # mean token loss over the global batch
    tokens: int        # sequence tokens over the global batch
    samples: int       # questions over the global batch
    label_tokens: int
    grad_norm: float = float("nan")


def train_step(model, micro_batches: list[tuple[dict[str, Any], list[str]]], info: DistInfo) -> StepStats:
    """Forward/backward over this rank's micro-batches (no optimizer step). Gradients end up as those of
    the global-batch mean loss; gradient sync runs only on the last micro-batch."""
    to_dev = [({k: v.to(info.device) if torch.is_tensor(v) else v for k, v in b.items()}, ids)
              for b, ids in micro_batches]
    local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, _ in to_dev)
    global_labels = all_reduce_sum(local_labels, info)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, (batch, _) in enumerate(to_dev):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(to_dev) - 1)
        loss, _ = forward_loss(model, batch)
        # x world size: FSDP averages gradients over ranks, we want the sum over the global batch.
        (loss * info.world_size / global_labels).backward()
        loss_sum += loss.detach().double().cpu()
    tokens = sum(b["input_ids"].numel() if b.get("attention_mask") is None or b["attention_mask"].dim() > 2
                 else int(b["attention_mask"].sum()) for b, _ in to_dev)
    samples = sum(len(ids) for _, ids in to_dev)
    return StepStats(loss=all_reduce_sum(float(loss_sum), info) / global_labels,
                     tokens=int(all_reduce_sum(tokens, info)), samples=int(all_reduce_sum(samples, info)),
                     label_tokens=int(global_labels))


def clip_and_step(model, opt, sched, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


# --- failures explained ------------------------------------------------------------------------------------

def explain_oom(micro_batches, cfg: TrainConfig) -> str:
    per_sample = [int(g.prod()) // 4 for b, _ in micro_batches for g in b["video_grid_thw"]]
    return (f"CUDA out of memory. Per-sample vision tokens in this step: max {max(per_sample)} "
            f"(video.fps={cfg.video.fps}, video.max_pixels={cfg.video.max_pixels}, "
            f"video.total_pixels={cfg.video.total_pixels}); train.micro_batch={cfg.train.micro_batch}. Lower "
            "video.fps or video.max_pixels (fewer vision tokens per sample), lower train.micro_batch (raise "
            "accumulation instead: train.global_batch stays), keep train.grad_checkpointing=true, or use more GPUs.")


def check_finite(stats: StepStats, step: int, micro_batches, info: DistInfo) -> None:
    if math.isfinite(stats.loss):
        return
    import torch.distributed as dist

    ids: list[list[str]] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(ids, [i for _, batch_ids in micro_batches for i in batch_ids])
    raise FloatingPointError(f"loss is {stats.loss} at step {step + 1}; samples in this step: "
                             f"{sorted(i for r in ids for i in r)}")


# --- what the user sees ------------------------------------------------------------------------------------

class Monitor:
    """tqdm bar, metrics.jsonl, TensorBoard, MLflow (when configured); rank 0 only."""

    def __init__(self, cfg: TrainConfig, out: Path, info: DistInfo, start: int, total: int, flops_per_token: float):
        from tqdm import tqdm

        self.cfg, self.out, self.info, self.start = cfg, out, info, start
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(info) if info.device.type == "cuda" else None
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not info.is_main)
        self.t0 = time.perf_counter()
        self.losses: list[float] = []
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start)
            _truncate_jsonl(out / "metrics.jsonl", start)

    def step(self, step: int, stats: StepStats, lr: float, seconds: float, data_s: float = 0.0) -> None:
        self.bar.update(1)
        self.losses.append(stats.loss)
        if not self.info.is_main or (step + 1) % self.cfg.train.log_every:
            return
        m = {"loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm, "tokens_per_s": stats.tokens / seconds,
             "samples_per_s": stats.samples / seconds, "step_s": seconds, "data_wait_s": data_s,
             "data_wait_frac": data_s / seconds}
        if self.peak:
            m["mfu"] = self.flops_per_token * stats.tokens / seconds / (self.peak * self.info.world_size)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{m['tokens_per_s']:.0f}",
                             samples_s=f"{m['samples_per_s']:.2f}", **({"mfu": f"{m['mfu']:.1%}"} if self.peak else {}))
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step + 1, **m}) + "\n")
        for k, v in m.items():
            self.tb.add_scalar(f"train/{k}", v, step + 1)
        tracking.log_metrics(m, step=step + 1, uri=self.cfg.tracking.uri)

    def close(self) -> Path | None:
        self.bar.close()
        if not self.info.is_main:
            return None
        self.tb.close()
        return plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")


def peak_flops(info: DistInfo) -> float | None:
    name = torch.cuda.get_device_name(info.device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """On resume, drop lines a killed run logged after the checkpoint it resumes from."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_through_step]
        path.write_text("".join(ln + "\n" for ln in lines))


def plot_loss(metrics: Path, png: Path) -> Path | None:
    if not metrics.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="optimizer step", ylabel="train loss (mean per label token)", title="SFT loss")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# --- the recipe --------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, info, resume)
    finally:
        close_distributed()


def _train(cfg: TrainConfig, info: DistInfo, resume: bool) -> TrainResult:
    out = Path(cfg.train.output_dir)
    ckpt_dir = out / "checkpoints"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.toml")
        ensure_inputs(cfg)
    barrier()

    # Model: same seed on every rank, so LoRA's random init is identical before sharding splits it.
    torch.manual_seed(cfg.train.seed)
    model, lora, counts = build_model(cfg, info.device)
    n_params = counts["total"]
    wrap_model(model, cfg, info)

    dataset, plan, collate = build_data(cfg, info)
    total = cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch
    opt, sched = build_optimizer(model, cfg, total, info.device.type == "cuda")
    start = maybe_resume(ckpt_dir, model, opt, sched, plan, cfg, info) if resume else 0
    loader = iter(make_loader(dataset, plan, start_step=start, total_steps=total, collate=collate,
                              num_workers=cfg.data.num_workers))
    flops_per_token = (6 if cfg.train.mode == "full" else 4) * n_params
    with tracking.stage_run(cfg.tracking.run_name, parent_run_id=cfg.tracking.parent_run_id,
                            experiment=cfg.tracking.experiment, uri=cfg.tracking.uri) if info.is_main else nullcontext():
        if info.is_main:
            tracking.log_params({"config": asdict(cfg), "params": counts}, uri=cfg.tracking.uri)
            print(f"parameters: {counts}; {plan.steps_per_epoch} steps/epoch, {total} steps, global batch "
                  f"{plan.global_batch} = {info.world_size} ranks x {plan.micro_batch} x {plan.accumulation} accumulation")
        monitor = Monitor(cfg, out, info, start, total, flops_per_token)
        # A step stuck in a collective names this rank and its samples, then exits (watchdog.py).
        with StallWatchdog(cfg.train.stall_timeout_s, rank=info.rank, world_size=info.world_size) as watchdog:
            saved = _loop(cfg, info, model, opt, sched, loader, plan, monitor, start, total, ckpt_dir, watchdog)
        png = monitor.close()
        final = out / "final"
        meta = _bundle_meta(cfg)
        if not cfg.model.random_init:
            checkpoint.export_bundle(model, final, base_model_dir=cfg.model.path, meta=meta, info=info, lora=lora)
        if info.is_main:
            for artifact in (out / "config.toml", out / "metrics.jsonl", png):
                if artifact:
                    tracking.log_artifact(artifact, uri=cfg.tracking.uri)
            print("model.random_init: random weights, no final/ bundle written" if cfg.model.random_init
                  else f"final model: {final}")
    return TrainResult(str(out), str(final), total, monitor.losses[-1] if monitor.losses else None,
                       monitor.losses, [str(p) for p in saved])


def build_data(cfg: TrainConfig, info: DistInfo):
    """Dataset (a question per item; with shared-prefix training a video and all its questions), this
    rank's batch plan, and the collate function."""
    from trafficvlm.model import load_processor
    from trafficvlm.processing import Preprocessor

    pre = Preprocessor(load_processor(cfg.model.path), cfg.video, system_prompt=cfg.prompt.system_prompt)
    ds_cls = VideoGroupDataset if cfg.train.shared_prefix else SFTDataset
    dataset = ds_cls(load_records(cfg), cfg.data.media_path, cfg.video, pre, max_length=cfg.model.max_length,
                     cache=_frame_cache(cfg))
    plan = BatchPlan(len(dataset), cfg.train.global_batch, cfg.train.micro_batch, info.world_size, info.rank,
                     cfg.train.seed)
    collate = collate_shared if cfg.train.shared_prefix else collate_fn(cfg.train.batching, pre.pad_token_id)
    return dataset, plan, collate


def maybe_resume(ckpt_dir: Path, model, opt, sched, plan: BatchPlan, cfg: TrainConfig, info: DistInfo) -> int:
    """Restore the last checkpoint (model, optimizer, scheduler, RNG); return the step to continue from."""
    last = checkpoint.latest(ckpt_dir)
    if last is None:
        if info.is_main:
            print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        return 0
    state = checkpoint.load(last, model, opt, info)
    _check_same_order(state, plan, cfg)
    sched.load_state_dict(state["scheduler"])
    if info.is_main:
        print(f"resuming from {last} (step {state['step']})")
    return state["step"]


def _loop(cfg, info, model, opt, sched, loader, plan, monitor, start, total, ckpt_dir, watchdog) -> list[Path]:
    saved: list[Path] = []
    for step in range(start, total):
        t0 = time.perf_counter()
        micro = [next(loader) for _ in range(plan.accumulation)]
        data_s = time.perf_counter() - t0  # waiting for the loader: the data path not keeping up
        watchdog.step_started(step + 1, [i for _, ids in micro for i in ids])
        try:
            stats = train_step(model, micro, info)
        except torch.OutOfMemoryError:
            raise RuntimeError(explain_oom(micro, cfg)) from None
        check_finite(stats, step, micro, info)
        lr = float(opt.param_groups[0]["lr"])  # this step's rate (torchao keeps a tensor); clip_and_step moves it on
        watchdog.phase("optimizer")
        stats.grad_norm = clip_and_step(model, opt, sched, cfg.train.max_grad_norm)
        monitor.step(step, stats, lr, time.perf_counter() - t0, data_s)
        watchdog.step_done()
        done = step + 1
        if cfg.model.random_init:  # random weights: nothing worth resuming (7B + AdamW state: ~100 GB)
            continue
        if done == total or (cfg.train.save_every and done % cfg.train.save_every == 0):
            state = {"scheduler": sched.state_dict(), "epoch": step // plan.steps_per_epoch,
                     "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
                     "seed": cfg.train.seed, "loss": stats.loss}
            saved.append(checkpoint.save(ckpt_dir, done, model, opt, state=state, info=info,
                                         keep_last=cfg.train.keep_last))
    return saved


def _check_same_order(state: dict[str, Any], plan: BatchPlan, cfg: TrainConfig) -> None:
    """A resumed run is the same run only with the same data order."""
    for key, now in (("global_batch", plan.global_batch), ("seed", cfg.train.seed),
                     ("steps_per_epoch", plan.steps_per_epoch)):
        if state.get(key) != now:
            raise ValueError(f"--resume: the checkpoint was written with {key}={state.get(key)}, this run has "
                             f"{now}; the data order would differ (start a new train.output_dir instead)")


def _frame_cache(cfg: TrainConfig):
    if cfg.data.frame_cache is None:
        return True
    from trafficvlm.video import FrameCache

    return FrameCache(cfg.data.frame_cache)


def _bundle_meta(cfg: TrainConfig) -> dict[str, Any]:
    from trafficvlm.model import bundle_meta, read_bundle_meta

    base = read_bundle_meta(cfg.model.path)
    base_model = base["base_model"] if base else str(cfg.model.path)
    return bundle_meta(cfg.video, cfg.prompt, base_model=base_model, training=asdict(cfg))

