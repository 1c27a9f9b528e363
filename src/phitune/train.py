"""The training story, top to bottom: config -> seed -> model -> LoRA -> data -> optimizer -> loop -> save.

    result = finetune("examples/phi3-mini-lora.yaml")
    result = finetune(model="microsoft/Phi-3-mini-4k-instruct", data="chats.jsonl",
                      training_config={"max_steps": 100}, peft_config={"r": 16, "target_modules": "all-linear"})

The loss of an optimizer step is the sum of token cross-entropies over all its micro-batches divided by the number of
supervised tokens in the whole step, so gradient accumulation gives the same update as one large batch (dividing
each micro-batch by its own token count would over-weight micro-batches with few trained tokens).
Logging, evaluation and checkpointing are named helpers below; the loop itself is in ``finetune``.

Under torchrun every process runs this same loop on its part of each micro-batch (phitune.distributed): the token
count of a step and the trainable gradients are summed over processes, and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import logging
import math
import random
import shutil
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed, outdir
from . import fast as fastpath
from ._typed import suggest
from .config import SECTIONS, RunConfig, TrainingConfig, load_config, read_yaml, run_status, save_config
from .errors import ConfigError, PhituneError
from .fast import FastPath
from .fast.attention import position_masks
from .gen_eval import generation_samples, probe_prompts_record, prompts_from_samples, training_probe
from .generate import context_length
from .interrupt import Interrupted, StopOnSignal, signal_name
from .labels import IGNORE_INDEX
from .preflight import check_data_paths, check_model_source
from .data.preview import data_warnings
from .metrics import MetricsLog, plot_loss_curve, progress_bar, read_metrics, resolve_backends, setup_logging
from .model import stop_token_ids

log = logging.getLogger("phitune")

NONFINITE_DUMP = "nonfinite_batch.pt"


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the run folder and the final metrics (plus the trained model and tokenizer)."""

    output_dir: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def finetune(config=None, *, model=None, data=None, training_config=None, peft_config=None, output_dir=None,
             overrides: list[str] | None = None, **unknown) -> FinetuneResult:
    """Fine-tune a causal LM with LoRA and write the run folder; the same path as ``phitune train``.

    ``config``: a RunConfig, a YAML path, or a dict of sections; the keyword sections (``model``, ``data``,
    ``training_config``, ``peft_config``; each a dict, or a string for model/data) replace the config's.
    ``output_dir`` overrides ``training_config.output_dir``; ``overrides`` are ``"section.key=value"`` strings.
    """
    if unknown:
        key = next(iter(unknown))
        raise ConfigError(f"finetune: unknown argument '{key}'{suggest(key, SECTIONS + ('config', 'output_dir'))}")
    cfg = _run_config(config, dict(model=model, data=data, training_config=training_config, peft_config=peft_config),
                      output_dir, overrides)
    with ExitStack() as run_scope:  # the output folder's lock and the signal handlers, released however we leave
        return _finetune(cfg, run_scope)


def _finetune(cfg: RunConfig, run_scope: ExitStack) -> FinetuneResult:
    tc = cfg.training_config
    created_group = distributed.init(tc)  # under torchrun: join the other processes (nothing in one process)
    main = distributed.is_main()
    setup_logging(tc.log_level if main else "warning")
    for note in cfg.notes + distributed.check_supported(cfg):
        log.info(note)

    # Everything that can refuse does so before the slow work: output folder, checkpoint, report_to packages.
    out = Path(tc.output_dir)
    existed = out.exists()
    world = distributed.world_size()
    settings = ckpt.resume_settings(cfg, world_size=world)
    try:
        resume_from = distributed.on_main(_prepare_output_dir, out, tc, settings, run_scope)
        resolve_backends(tc.report_to)
        tokenizer, prepared = _checks_before_weights(cfg, main)
    except BaseException:
        if not existed and out.is_dir() and all(p.name == outdir.LOCK_NAME for p in out.iterdir()):
            (out / outdir.LOCK_NAME).unlink(missing_ok=True)  # a run that failed its checks leaves no folder behind
            out.rmdir()
        raise
    done = _finished_steps(out) if tc.resume_from_checkpoint else None
    if done is not None and done >= _planned_steps(prepared, cfg, world):
        log.warning("training_config.output_dir: the run in %s is complete (%d steps); nothing to resume. Raise "
                    "max_steps or num_train_epochs to train further, or set overwrite_output_dir: true to start "
                    "over", out, done)
        distributed.finish(created_group)
        return FinetuneResult(output_dir=out, metrics=json.loads((out / "final_metrics.json").read_text()))

    # seed -> model -> LoRA
    seed_everything(tc.seed)
    from .adapt import add_lora
    from .loss import apply_fast_path, forward_loss
    from .model import load_model_and_tokenizer, resolve_device

    device = resolve_device(tc.use_cpu)  # under torchrun: this process's GPU (LOCAL_RANK)
    _set_tf32(tc.tf32, device)

    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, host_load=distributed.fsdp_enabled(tc),
                                                tokenizer=tokenizer)
    report = add_lora(model, cfg.peft_config, lora_dtype=torch.float32)  # fp32 adapters even on a bf16 base
    log.info("%s", report)
    for note in distributed.prepare_model(model, tc, device):  # same LoRA start everywhere; FSDP2 if asked
        log.info("%s", note)
    enable_gradient_checkpointing(model, tc)
    fast = apply_fast_path(model, tc)
    for note in fast.notes:
        log.info("fast path: %s", note)
    distributed.seed_per_process(tc.seed)  # dropout masks differ between processes

    # data: one plan on every process, micro-batches of bs x processes; each process trains on its part
    _, batch_plan, collate = data_api()
    dc = cfg.data
    make_batch = batch_maker(model, tokenizer, dc, collate, fast)
    my_part = distributed.sharder()
    bs, accum = tc.per_device_train_batch_size, tc.gradient_accumulation_steps
    plans: dict[int, list] = {}

    def plan(epoch: int) -> list:
        if epoch not in plans:
            plans.clear()
            plans[epoch] = batch_plan(prepared.train, bs * world, dc.max_seq_length, dc.packing, dc.seed, epoch)
        return plans[epoch]

    steps_per_epoch = math.ceil(len(plan(0)) / accum)
    if steps_per_epoch == 0:
        raise PhituneError("the training data gave no batches: check data.train and data.max_seq_length")
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.num_train_epochs * steps_per_epoch)
    done = _finished_steps(out) if tc.resume_from_checkpoint else None
    if done is not None and done >= _planned_steps(prepared, cfg, world):
        log.warning("training_config.output_dir: the run in %s is complete (%d steps); nothing to resume. Raise "
                    "max_steps or num_train_epochs to train further, or set overwrite_output_dir: true to start "
                    "over", out, done)
        distributed.finish(created_group)
        return FinetuneResult(output_dir=out, metrics=json.loads((out / "final_metrics.json").read_text()))

    # optimizer and schedule
    optimizer = build_optimizer(model, tc, device)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.fp16 and device.type == "cuda")
    autocast = autocast_context(tc, device)

    state = TrainState()
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                     scaler=scaler, rank=distributed.rank(), world_size=world)
        state = TrainState.from_dict(saved["extra"]["train_state"])
        log.info("resumed from %s (step %d of %d)", resume_from, state.step, total_steps)
        cfg = _kept_from_checkpoint(cfg, optimizer)
    distributed.on_main(save_config, with_absolute_paths(cfg), out / "phitune_config.yaml", status="incomplete")

    metrics_log = MetricsLog(out, tc.report_to, run_name=tc.run_name or out.resolve().name, config=cfg.to_dict(),
                             resume_step=state.step if resume_from is not None else None, write=main)
    log.info("training %d steps (%d per epoch; %d sequences x %d accumulation%s), %d train samples, %d eval samples",
             total_steps, steps_per_epoch, bs, accum, f" x {world} processes" if world > 1 else "",
             len(prepared.train), len(prepared.eval or []))

    probe = generation_probe(model, tokenizer, prepared, dc, tc)

    def run_eval() -> dict[str, float]:
        with autocast:
            metrics = evaluate_samples(model, prepared.eval, dc, tc.per_device_eval_batch_size, tokenizer=tokenizer,
                                       fast=fast)
            return {**metrics, **probe()}

    # the loop; SIGINT/SIGTERM stop it at a step boundary with a checkpoint (phitune.interrupt)
    stop = run_scope.enter_context(StopOnSignal())
    saved_step = state.step if resume_from is not None else -1
    model.train()
    bar = progress_bar(total_steps, state.step, tc.disable_tqdm or not main)
    started = time.perf_counter()
    if tc.eval_on_start and state.step == 0 and prepared.eval:
        metrics_log.log({"step": 0, "epoch": 0.0, **run_eval()})
    while state.step < total_steps:
        entries = plan(state.epoch)[state.micro:state.micro + accum]
        batches = [process_batch(make_batch, prepared.train, e, my_part) for e in entries]
        step = train_step(model, batches, optimizer, scheduler, scaler, tc, device, autocast,
                          functools.partial(forward_loss, fast=fast))
        if not math.isfinite(step["loss"]) or not math.isfinite(step["grad_norm"]):
            stop_on_nonfinite(out, state, step, batches)

        state.step += 1
        state.micro += len(entries)
        epoch_done = state.micro >= len(plan(state.epoch))
        if epoch_done:
            state.epoch, state.micro = state.epoch + 1, 0
        state.add(step)
        bar.update(1)
        bar.set_postfix(loss=f"{step['loss']:.4f}", lr=f"{step['lr']:.2e}", gnorm=f"{step['grad_norm']:.3f}",
                        tok_s=f"{state.tokens_per_s():.0f}", refresh=False)

        last = state.step == total_steps
        epoch_f = state.epoch + state.micro / max(len(plan(state.epoch)), 1)
        if should_log(tc, state.step, epoch_done, last):
            metrics_log.log({"step": state.step, "epoch": round(epoch_f, 4), **state.window_metrics()})
            state.reset_window()
        if prepared.eval and should_eval(tc, state.step, epoch_done, last):
            metrics_log.log({"step": state.step, "epoch": round(epoch_f, 4), **run_eval()})
        if should_save(tc, state.step, epoch_done):
            with stop.saving():
                save_checkpoint(out, state, model, optimizer, scheduler, scaler, settings, cfg)
            saved_step = state.step
        if distributed.sum_ints(int(stop.signum is not None))[0] and not last:  # any process got a signal
            bar.close()
            if saved_step != state.step:
                with stop.saving():
                    save_checkpoint(out, state, model, optimizer, scheduler, scaler, settings, cfg)
            metrics_log.close()
            signum = stop.signum or signal.SIGTERM
            raise Interrupted(signum, f"stopped by {signal_name(signum)} after step {state.step} of {total_steps}; "
                              f"checkpoint saved to {ckpt.checkpoints_dir(out) / f'{ckpt.PREFIX}{state.step}'}. "
                              "Resume with training_config.resume_from_checkpoint: auto",
                              checkpoint=ckpt.checkpoints_dir(out) / f"{ckpt.PREFIX}{state.step}", output_dir=out)
    bar.close()

    # save
    final = {"train_loss": state.mean_loss(), "train_steps": state.step, "train_tokens": state.total_tokens,
             "train_runtime_s": round(time.perf_counter() - started, 2)}
    if prepared.eval:
        last_eval = distributed.on_main(_logged_eval, metrics_log.path, state.step)
        final.update({k: v for k, v in (last_eval or run_eval()).items() if k.startswith("eval_")})
    metrics_log.close()
    with stop.saving():  # a signal during the final save is honoured once the run folder is complete
        distributed.on_main(save_run, out, cfg, model, tokenizer, prepared.stats, final, report)
    log.info("saved to %s", out)
    distributed.finish(created_group)
    fastpath.remove(model, fast)  # the user gets the model's own classes back (same parameters)
    return FinetuneResult(output_dir=out, metrics=final, model=model, tokenizer=tokenizer)


def _checks_before_weights(cfg: RunConfig, main: bool):
    """Everything after the config that needs no weights, in the order a user fixes things: model folder or id,
    data paths, tokenizer and chat template, every record, the data statistics (their warnings printed here).
    Returns (tokenizer, prepared data)."""
    from .model import load_tokenizer

    cfg.peft_config.check_targets()
    check_model_source(cfg.model)
    check_data_paths(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    prepare_data = data_api()[0]
    with distributed.local_main_first():  # one process per node writes the data cache, the others read it
        prepared = prepare_data(cfg.data, tokenizer)
    if main:
        for split in ("train", "eval"):
            for line in data_warnings(split, prepared.stats[split]) if prepared.stats.get(split) else []:
                log.warning("%s", line)
    return tokenizer, prepared


def _planned_steps(prepared, cfg: RunConfig, world: int) -> int:
    """The optimizer steps the config asks for (max_steps, or epochs of the batch plan)."""
    tc, dc = cfg.training_config, cfg.data
    if tc.max_steps > 0:
        return tc.max_steps
    batches = len(data_api()[1](prepared.train, tc.per_device_train_batch_size * world, dc.max_seq_length,
                                dc.packing, dc.seed, 0))
    return math.ceil(tc.num_train_epochs * math.ceil(batches / tc.gradient_accumulation_steps))


def _finished_steps(out: Path) -> int | None:
    """The steps a finished run in ``out`` trained (its final_metrics.json), or None when it did not finish (no
    final adapter, or its config still marked incomplete)."""
    if not (out / "adapter_model.safetensors").is_file() or run_status(out / "phitune_config.yaml") == "incomplete":
        return None
    try:
        return int(json.loads((out / "final_metrics.json").read_text())["train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# optimizer hyperparameters a resumed run takes from the checkpoint's optimizer state, not from the config
_OPTIMIZER_KEYS = {"learning_rate": lambda g: g.get("initial_lr", g["lr"]), "adam_beta1": lambda g: g["betas"][0],
                   "adam_beta2": lambda g: g["betas"][1], "adam_epsilon": lambda g: g["eps"]}


def _kept_from_checkpoint(cfg: RunConfig, optimizer) -> RunConfig:
    """The config with the values the resumed optimizer really uses; a changed one is said on the console, so the
    run's phitune_config.yaml and README record what trained, not what was asked."""
    group = optimizer.param_groups[0]
    kept = {}
    for key, read in _OPTIMIZER_KEYS.items():
        used, asked = float(read(group)), float(getattr(cfg.training_config, key))
        if not math.isclose(used, asked, rel_tol=1e-9, abs_tol=0.0):
            log.warning("training_config.%s: %g given, but the resumed run keeps the checkpoint's %g (its optimizer "
                        "and schedule continue); recorded as %g. Start a new run (overwrite_output_dir: true) to "
                        "use the new value", key, asked, used, used)
            kept[key] = used
    if not kept:
        return cfg
    return dataclasses.replace(cfg, training_config=dataclasses.replace(cfg.training_config, **kept))


def _logged_eval(metrics_path: Path, step: int) -> dict | None:
    """The evaluation already logged at ``step`` (the loop's last one), if any."""
    records = read_metrics(metrics_path)
    return next((r for r in reversed(records) if "eval_loss" in r and r["step"] == step), None)


def save_checkpoint(out: Path, state: "TrainState", model, optimizer, scheduler, scaler, settings: dict,
                    cfg: RunConfig) -> None:
    """Write checkpoint-STEP and apply save_total_limit, on rank 0 (with every process's RNG state)."""
    rng_per_process = distributed.gather_objects(ckpt.rng_state())  # None in one process

    def write():
        saved = ckpt.save_checkpoint(out, state.step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     data_position={"epoch": state.epoch, "micro_batch": state.micro},
                                     settings=settings, base_model_name_or_path=cfg.model.name_or_path,
                                     scaler=scaler, extra={"train_state": state.to_dict()},
                                     rng_per_process=rng_per_process)
        ckpt.rotate_checkpoints(out, cfg.training_config.save_total_limit, keep=saved)

    distributed.on_main(write)


# --- config and output folder -----------------------------------------------------------------------------------------


def _run_config(config, sections: dict, output_dir, overrides) -> RunConfig:
    given = {k: v for k, v in sections.items() if v is not None}
    if output_dir is not None:
        overrides = [f"training_config.output_dir={output_dir}"] + list(overrides or [])
    if not given:
        if config is None:
            raise ConfigError("finetune: give a config (YAML path, dict or RunConfig) or the model= and data= "
                              "sections")
        return load_config(config, overrides)
    if config is None:
        base = {}
    elif isinstance(config, RunConfig):
        base = {name: getattr(config, name) for name in SECTIONS}
    elif isinstance(config, (str, Path)):
        base = read_yaml(config)[0]
    else:
        base = dict(config)
    base.update(given)
    return load_config(_as_plain_sections(base), overrides)


def _as_plain_sections(sections: dict) -> dict:
    """Section objects (dataclasses) back to dicts, values untouched (a Dataset stays one), so overrides apply."""
    out = {}
    for name, value in sections.items():
        if dataclasses.is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init and f.name != "notes"}
        out[name] = value
    return out


def _prepare_output_dir(out: Path, tc: TrainingConfig, settings: dict, run_scope: ExitStack) -> Path | None:
    """The checkpoint to resume from (checked against the config), or None for a fresh run; refuses to mix runs,
    to write into a folder phitune did not create, and to share the folder with a running run (the lock is held
    until ``run_scope`` closes)."""
    outdir.check_output_folder(out, what="training_config.output_dir", owned=outdir.is_run_folder,
                               choose="choose another folder (--set training_config.output_dir=NEW_DIR)")
    run_scope.enter_context(outdir.lock_output_dir(out))
    resume_from = ckpt.resolve_resume(tc.resume_from_checkpoint, out)
    if resume_from is not None:
        ckpt.check_compatible(resume_from, settings)
        out.mkdir(parents=True, exist_ok=True)
        return resume_from
    earlier = ckpt.list_checkpoints(out) or (out / "adapter_model.safetensors").exists()
    if earlier and tc.resume_from_checkpoint and _finished_steps(out) is not None:
        return None  # a finished run: finetune says so once it knows the steps asked for
    if earlier:
        if not tc.overwrite_output_dir:
            raise ConfigError(
                f"training_config.output_dir: {out} already holds a run. Set resume_from_checkpoint: auto to continue "
                "it, overwrite_output_dir: true to start over, or choose another output_dir."
            )
        shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def save_run(out: Path, cfg: RunConfig, model, tokenizer, data_stats: dict, final: dict, report) -> None:
    """The final run folder: adapter, tokenizer + chat template, generation config, resolved config, metrics, README."""
    from .adapt import save_adapter
    from .model import generation_config_for

    out.mkdir(parents=True, exist_ok=True)
    cfg = with_absolute_paths(cfg)  # the folder must reopen from any working directory (eval/chat/merge)
    save_adapter(model, out, base_model_name_or_path=cfg.model.name_or_path)
    tokenizer.save_pretrained(out)
    generation_config_for(model, tokenizer).save_pretrained(out)
    save_config(cfg, out / "phitune_config.yaml", status="complete")
    (out / "data_stats.json").write_text(json.dumps(data_stats, indent=1, default=str), encoding="utf-8")
    (out / "final_metrics.json").write_text(json.dumps(final, indent=1), encoding="utf-8")
    records = read_metrics(out / "metrics.jsonl")
    plot_loss_curve(records, out / "loss_curve.png")
    (out / "README.md").write_text(run_readme(out, cfg, final, report, data_stats), encoding="utf-8")


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose local paths (base model, tokenizer, data files) are absolute; Hub ids stay as they
    are."""

    def absolute(value):
        if isinstance(value, (str, os.PathLike)) and Path(value).exists():
            return str(Path(value).resolve())
        return value

    model = dataclasses.replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path),
                                tokenizer=absolute(cfg.model.tokenizer))
    data = dataclasses.replace(cfg.data, train=absolute(cfg.data.train), eval=absolute(cfg.data.eval))
    return dataclasses.replace(cfg, model=model, data=data)


def run_readme(out: Path, cfg: RunConfig, final: dict, report, data_stats: dict) -> str:
    tc = cfg.training_config
    lines = [
        f"# {out.name}: LoRA fine-tune of `{cfg.model.name_or_path}`",
        "",
        f"Trained with phitune: {final['train_steps']} optimizer steps, learning rate {tc.learning_rate:g} "
        f"({tc.lr_scheduler_type}), {tc.per_device_train_batch_size} x {tc.gradient_accumulation_steps} "
        f"sequences per step, max_seq_length {cfg.data.max_seq_length}, packing {cfg.data.packing}.",
        "",
        f"- adapter: {report}",
        f"- peft_config: r={cfg.peft_config.r}, lora_alpha={cfg.peft_config.lora_alpha}, "
        f"lora_dropout={cfg.peft_config.lora_dropout}, target_modules={cfg.peft_config.target_modules}",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
    lines += [
        "",
        "## Files",
        "",
        "adapter_config.json + adapter_model.safetensors (PEFT layout), tokenizer files and chat template, "
        "generation_config.json (stops on every end-of-turn id), phitune_config.yaml (the resolved config), "
        "metrics.jsonl, loss_curve.png, data_stats.json, checkpoints/.",
        "",
        "## Use",
        "",
        "```",
        f"phitune chat {out}",
        f"phitune eval {out}",
        f"phitune merge {out} --out {out}-merged",
        "```",
        "",
        "With peft: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
        f"\"{out}\")`.",
        "",
    ]
    if data_stats:
        lines += ["## Data", "", "```", json.dumps(data_stats, indent=1, default=str)[:3000], "```", ""]
    return "\n".join(lines)


# --- seed, optimizer, schedule, precision -----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _set_tf32(tf32: bool | None, device: torch.device) -> None:
    if tf32 is not None and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def build_optimizer(model, tc: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PhituneError("no trainable parameters: peft_config targets nothing trainable")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda" or tc.optim == "adamw_torch_fused"
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon,
                             fused=fused)


def lr_multiplier(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warmup, then the decay ``kind``."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear


def build_scheduler(optimizer, tc: TrainingConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = tc.warmup_steps_for(total_steps)
    if tc.lr_scheduler_type == "constant" and warmup:
        log.info("lr_scheduler_type constant ignores warmup (%d steps); use constant_with_warmup", warmup)
    kind = tc.lr_scheduler_type

    def factor(step: int) -> float:
        return lr_multiplier(step, kind=kind, warmup=warmup, total=total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_context(tc: TrainingConfig, device: torch.device):
    """bf16/fp16 mixed precision for forward passes (the base weights keep model.dtype)."""
    if tc.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("training_config.bf16: this GPU has no bfloat16 support; set fp16: true instead")
        from .model import cpu_has_fast_half

        if device.type == "cpu" and not cpu_has_fast_half(torch.bfloat16):
            log.warning("training_config.bf16: this CPU has no bfloat16 matrix hardware (AVX512-BF16 or AMX), where "
                        "bfloat16 autocast makes each backward matmul about 100x slower than float32; training in "
                        "the model's dtype instead. Set bf16: false to silence this.")
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if tc.fp16:
        if device.type != "cuda":
            log.info("training_config.fp16: float16 autocast needs a CUDA GPU; training in the model's dtype")
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def enable_gradient_checkpointing(model, tc: TrainingConfig) -> None:
    """Recompute activations in backward; non-reentrant so LoRA weights inside frozen blocks get gradients."""
    from .model import enable_checkpointing

    if tc.gradient_checkpointing:
        enable_checkpointing(model, tc.gradient_checkpointing_kwargs)


# --- one optimizer step -----------------------------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def supervised_tokens(batch: dict) -> int:
    """Tokens that carry a loss: labels[:, 1:] != -100 (labels are unshifted)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _input_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return batch["input_ids"].numel()


def train_step(model, batches: list[dict], optimizer, scheduler, scaler, tc: TrainingConfig, device, autocast,
               forward_loss) -> dict[str, float]:
    """Forward/backward every micro-batch, clip, step. Each micro-batch's summed loss is divided by the supervised
    tokens of the WHOLE step, so the accumulated gradient equals that of one batch holding all of them."""
    n_tokens, input_tokens = distributed.sum_ints(sum(supervised_tokens(b) for b in batches),
                                                  sum(_input_tokens(b) for b in batches))  # over all processes
    divisor = max(n_tokens, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for batch in batches:
        batch = _to_device(batch, device)
        with autocast:
            out = forward_loss(model, batch)
        scaler.scale(out.loss_sum.float() / divisor).backward()
        loss_sum += out.loss_sum.detach().float()

    params = [p for g in optimizer.param_groups for p in g["params"]]
    distributed.sum_gradients(params)  # one all-reduce after accumulation (nothing in one process)
    distributed.sum_(loss_sum)
    scaler.unscale_(optimizer)
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = optimizer.param_groups[0]["lr"]
    loss = (loss_sum / divisor).item()
    grad_norm = float(grad_norm)
    if n_tokens == 0:  # cannot happen with packed data (samples without supervised tokens are dropped), but say so
        log.warning("an optimizer step had no supervised tokens in any of its micro-batches; its update was skipped")
    if math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled()) and n_tokens > 0:
        scaler.step(optimizer)  # with fp16 loss scaling, a step with overflowed gradients is skipped
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if scaler.is_enabled() and not math.isfinite(grad_norm):
        grad_norm = 0.0  # an fp16 overflow that the scaler handled, not a divergence
    return {"loss": loss, "loss_sum": float(loss_sum), "tokens": n_tokens, "grad_norm": grad_norm, "lr": lr,
            "input_tokens": input_tokens}


def process_batch(make_batch, samples, entry: list[int], part=list) -> dict:
    """This process's micro-batch of plan ``entry`` (``part``: phitune.distributed.sharder). An empty part (end of
    an epoch, more processes than rows) becomes a batch without labels: no loss, but the process still takes part
    in the step's collectives."""
    mine = part(entry)
    return make_batch(samples, mine) if mine else _without_labels(make_batch(samples, entry[:1]))


def _without_labels(batch: dict) -> dict:
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def stop_on_nonfinite(out: Path, state: "TrainState", step: dict, batches: list[dict]) -> None:
    """Save the offending batch and stop with a message that says what to try."""
    path = out / NONFINITE_DUMP
    if distributed.is_main():  # every process stops here (the loss is global); rank 0's micro-batches are saved
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"step": state.step + 1, "loss": step["loss"], "grad_norm": step["grad_norm"], "lr": step["lr"],
                    "batches": [{k: v.cpu() for k, v in b.items() if torch.is_tensor(v)} for b in batches]}, path)
    what = "loss" if not math.isfinite(step["loss"]) else "gradient norm"
    raise PhituneError(
        f"step {state.step + 1}: the {what} is not finite (loss {step['loss']}, grad norm {step['grad_norm']}, "
        f"lr {step['lr']:.3g}); training stopped before the update. The micro-batches of this step are saved in "
        f"{path} (torch.load(path, weights_only=True)). Try a lower learning_rate, bf16 instead of fp16, "
        "max_grad_norm: 1.0, or check those samples; resume_from_checkpoint: auto restarts from the last checkpoint."
    )


# --- bookkeeping ------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Loop position and running sums; saved in every checkpoint so that a resumed run logs the same numbers."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # next micro-batch of the epoch's plan
    total_loss_sum: float = 0.0
    total_tokens: int = 0
    window_loss_sum: float = 0.0
    window_tokens: int = 0
    window_steps: int = 0
    window_grad_norm: float = 0.0
    window_lr: float = 0.0
    _window_start: float = field(default_factory=time.perf_counter, repr=False)
    _window_input_tokens: int = 0

    def add(self, s: dict) -> None:
        self.total_loss_sum += s["loss_sum"]
        self.total_tokens += s["tokens"]
        self.window_loss_sum += s["loss_sum"]
        self.window_tokens += s["tokens"]
        self.window_steps += 1
        self.window_grad_norm += s["grad_norm"]
        self.window_lr = s["lr"]
        self._window_input_tokens += s["input_tokens"]

    def tokens_per_s(self) -> float:
        return self._window_input_tokens / max(time.perf_counter() - self._window_start, 1e-9)

    def window_metrics(self) -> dict[str, float]:
        return {"loss": self.window_loss_sum / max(self.window_tokens, 1),
                "lr": self.window_lr,
                "grad_norm": self.window_grad_norm / max(self.window_steps, 1),
                "tokens_per_s": round(self.tokens_per_s(), 1),
                "supervised_tokens": self.window_tokens}

    def reset_window(self) -> None:
        self.window_loss_sum, self.window_tokens, self.window_steps, self.window_grad_norm = 0.0, 0, 0, 0.0
        self._window_start, self._window_input_tokens = time.perf_counter(), 0

    def mean_loss(self) -> float:
        return self.total_loss_sum / max(self.total_tokens, 1)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and not k.startswith("_")})


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def should_log(tc: TrainingConfig, step: int, epoch_done: bool, last: bool) -> bool:
    if tc.logging_strategy == "no":
        return False
    if tc.logging_first_step and step == 1:
        return True
    if tc.logging_strategy == "epoch":
        return epoch_done or last
    return _due(tc.logging_steps, step) or last


def should_eval(tc: TrainingConfig, step: int, epoch_done: bool, last: bool) -> bool:
    if tc.eval_strategy == "epoch":
        return epoch_done or last
    if tc.eval_strategy == "steps":
        return _due(tc.eval_steps or tc.logging_steps, step) or last
    return last  # the final evaluation


def should_save(tc: TrainingConfig, step: int, epoch_done: bool) -> bool:
    if tc.save_strategy == "epoch":
        return epoch_done
    return tc.save_strategy == "steps" and _due(tc.save_steps, step)


# --- evaluation -------------------------------------------------------------------------------------------------------


def generation_probe(model, tokenizer, prepared, data_cfg, tc: TrainingConfig):
    """``probe() -> dict``: with ``eval_generate: N``, greedy answers to the first N eval conversations and their
    scores (phitune.gen_eval.training_probe), the prompts added the first time; otherwise an empty dict. Every
    process generates (an FSDP-sharded model needs all of them in each forward); rank 0 logs."""
    if not tc.eval_generate:
        return dict
    if not prepared.eval:
        log.warning("training_config.eval_generate: there is no eval data to answer; set data.eval or "
                    "data.eval_split")
        return dict
    with distributed.local_main_first():
        samples = generation_samples(prepared, data_cfg, tokenizer, "eval")
    stops, context = stop_token_ids(tokenizer, model), context_length(model, tokenizer)
    prompts, _ = prompts_from_samples(samples, tokenizer, stop_ids=stops, context=context,
                                      max_samples=tc.eval_generate)
    first = [True]

    def probe() -> dict:
        record = training_probe(model, tokenizer, prompts, stop_ids=stops, context=context,
                                batch_size=tc.per_device_eval_batch_size)
        if first[0]:
            record.update(probe_prompts_record(prompts))
            first[0] = False
        return record

    return probe


def data_api():
    """(prepare_data, batch_plan, collate) of phitune.data."""
    try:
        from .data import batch_plan, collate, prepare_data
    except ImportError:  # phitune.data's package file not there yet
        from .data.batching import batch_plan, collate
        from .data.prepare import prepare_data
    return prepare_data, batch_plan, collate


def batch_maker(model, tokenizer, data_cfg, collate=None, fast: FastPath | None = None):
    """``make(samples, plan_entry) -> batch`` with the model's attention kernel, mask dtype and sliding window.
    Whether packed rows need a dense 4-D mask is decided here, once per model (``fast``: what apply_fast_path
    turned on)."""
    if collate is None:
        collate = data_api()[2]
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    kwargs = {"mask_dtype": model.dtype, "sliding_window": getattr(model.config, "sliding_window", None),
              "position_masks": position_masks(model, (fast or FastPath()).position_masks)}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id

    def make(samples, entry):
        return collate(samples, entry, data_cfg.max_seq_length, data_cfg.packing, attn, **kwargs)

    return make


@torch.no_grad()
def evaluate_samples(model, samples, data_cfg, batch_size: int, *, tokenizer=None,
                     fast: FastPath | None = None) -> dict[str, float]:
    """Loss, perplexity and token accuracy over the supervised tokens of tokenized ``samples``."""
    from .loss import forward_loss

    batch_plan = data_api()[1]
    make_batch = batch_maker(model, tokenizer, data_cfg, fast=fast)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, n_correct = 0.0, 0, 0
    plan = batch_plan(samples, batch_size, data_cfg.max_seq_length, data_cfg.packing, data_cfg.seed, 0)
    for entry in distributed.striped(plan):  # under torchrun: every world_size-th entry; None keeps in step
        batch = make_batch(samples, entry) if entry is not None else _without_labels(make_batch(samples, plan[0]))
        out = forward_loss(model, _to_device(batch, device), with_accuracy=True, fast=fast)
        loss_sum += float(out.loss_sum)
        n_tokens += int(out.n_tokens)
        n_correct += int(out.n_correct)
    if distributed.active():
        loss_sum, n_tokens, n_correct = distributed.sum_floats(loss_sum, n_tokens, n_correct)
        n_tokens, n_correct = int(n_tokens), int(n_correct)
    model.train(was_training)
    loss = loss_sum / max(n_tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_token_accuracy": n_correct / max(n_tokens, 1), "eval_tokens": n_tokens}
