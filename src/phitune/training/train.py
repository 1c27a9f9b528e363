"""The training story, top to bottom: config -> seed -> model -> LoRA -> data -> optimizer -> loop -> save.

    result = finetune("examples/phi3-mini-lora.yaml")
    result = finetune(model="microsoft/Phi-3-mini-4k-instruct", data="chats.jsonl",
                      training_config={"max_steps": 100}, peft_config={"r": 16, "target_modules": "all-linear"})

The loss of an optimizer step is the sum of token cross-entropies over all its micro-batches divided by the number of
supervised tokens in the whole step, so gradient accumulation gives the same update as one large batch (dividing
each micro-batch by its own token count would over-weight micro-batches with few trained tokens).
Logging, evaluation and checkpointing are named helpers below; the loop itself is in ``finetune``.

Under torchrun every process runs this same loop on its part of each micro-batch (phitune.training.distributed): the
token
count of a step and the trainable gradients are summed over processes, and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed, fsdp, loss, preference
from ..runs import ownership as outdir
from . import fast as fastpath
from .._typed import suggest
from ..adapt import add_lora
from ..config import SECTIONS, RunConfig, TrainingConfig, load_config, read_yaml, save_config
from ..data import batch_plan
from ..data.preference import pair_plan
from ..errors import ConfigError, PhituneError
from .evaluation import evaluate_samples, generation_probe
from .interrupt import Interrupted, StopOnSignal, signal_name
from .metrics import MetricsLog, progress_bar, resolve_backends, setup_logging
from ..models.loading import checkpoint_files, load_model_and_tokenizer, resolve_device
from ..plan import resolve_auto_batch
from .optim import autocast_context, build_optimization, enable_gradient_checkpointing, seed_everything, set_tf32
from .preflight import checks_before_weights
from ..runs.folder import finished_steps, logged_eval, prepare_output_dir, save_run, with_absolute_paths
from .schedule import TrainState, should_eval, should_log, should_save
from .step import batch_maker, process_batch, supervised_tokens, train_step

log = logging.getLogger("phitune")

NONFINITE_DUMP = "nonfinite_batch.pt"
_BAR_METRICS = ("rewards/accuracies", "rewards/margins")  # of a preference step, next to its loss


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
        run_scope.enter_context(distributed.explain_lost_peers(cfg.training_config.output_dir))
        return _finetune(cfg, run_scope)


def _finetune(cfg: RunConfig, run_scope: ExitStack) -> FinetuneResult:
    tc, dc = cfg.training_config, cfg.data
    created_group = distributed.init(tc)  # under torchrun: join the other processes (nothing in one process)
    main = distributed.is_main()
    setup_logging(tc.log_level if main else "warning")
    for note in cfg.notes + fsdp.check_supported(cfg):
        log.info(note)
    # per_device_train_batch_size: auto is decided first: the resume check, the batch plan and the saved config
    # all need the real micro-batch (a CPU run is refused here, before anything slow)
    cfg = resolve_auto_batch(cfg, resolve_device(cfg.training_config.use_cpu), distributed.world_size())
    tc = cfg.training_config

    # Everything that can refuse does so before the slow work: output folder, report_to packages, model, data.
    out, world = Path(tc.output_dir), distributed.world_size()
    settings = ckpt.resume_settings(cfg, world_size=world)
    resume_from, tokenizer, prepared = _before_weights(cfg, out, settings, run_scope)
    plans = EpochPlans(prepared.train, dc, tc.per_device_train_batch_size * world, tc.gradient_accumulation_steps,
                       pairs=prepared.kind == "pairs")
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.num_train_epochs * plans.steps_per_epoch)
    if (complete := _already_complete(out, tc, total_steps, created_group)) is not None:
        return complete

    # seed -> model -> LoRA -> fast path
    seed_everything(tc.seed)
    device = resolve_device(tc.use_cpu)  # under torchrun: this process's GPU (LOCAL_RANK)
    model, tokenizer, report, fast = _model_with_lora(cfg, device, tokenizer)

    # optimizer and schedule; a resume restores them with the loop position
    optimizer, scheduler, scaler = build_optimization(model, tc, device, total_steps)
    autocast = autocast_context(tc, device)
    state, cfg, saved = _resume(resume_from, cfg, model, optimizer, scheduler, scaler, world, total_steps)

    # the method (sft, dpo, orpo) chooses the loss, what a step divides it by, and how rows are batched
    if tc.method == "sft":
        step_loss, units = functools.partial(loss.forward_loss, fast=fast), supervised_tokens
        make_batch, my_part, reference = batch_maker(model, tokenizer, dc, fast), distributed.sharder(), {}
    else:
        state.unit = "pairs"
        reference = _reference_log_probs(cfg, model, tokenizer, prepared, fast, autocast, saved)
        step_loss, units = preference.objective(tc, fast)
        make_batch = preference.pair_batch_maker(model, tokenizer, dc, fast, reference.get("train"))
        my_part = preference.pair_sharder()
    distributed.on_main(save_config, with_absolute_paths(cfg), out / "phitune_config.yaml", status="incomplete")
    metrics_log = MetricsLog(out, tc.report_to, run_name=tc.run_name or out.resolve().name, config=cfg.to_dict(),
                             resume_step=state.step if resume_from is not None else None, write=main)
    _log_plan(tc, total_steps, plans.steps_per_epoch, world, prepared)
    for line in distributed.describe_layout(model, optimizer, tc):  # what each process (GPU) holds, before step 1
        log.info("%s", line)
    run_eval = _evaluator(model, tokenizer, prepared, cfg, fast, autocast, reference.get("eval"))
    save = functools.partial(save_checkpoint, out, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler, settings=settings, cfg=cfg, reference=reference)

    # the loop; SIGINT/SIGTERM stop it at a step boundary with a checkpoint (phitune.training.interrupt)
    stop = run_scope.enter_context(StopOnSignal())
    saved_step = state.step if resume_from is not None else -1
    model.train()
    bar = progress_bar(total_steps, state.step, tc.disable_tqdm or not main)
    started = time.perf_counter()
    if tc.eval_on_start and state.step == 0 and prepared.eval:
        metrics_log.log({"step": 0, "epoch": 0.0, **run_eval()})
    while state.step < total_steps:
        entries = plans(state.epoch)[state.micro:state.micro + tc.gradient_accumulation_steps]
        batches = [process_batch(make_batch, prepared.train, e, my_part) for e in entries]
        step = train_step(model, batches, optimizer, scheduler, scaler, tc, device, autocast, step_loss, units)
        if not math.isfinite(step["loss"]) or not math.isfinite(step["grad_norm"]):
            stop_on_nonfinite(out, state, step, batches)
        epoch_done = state.advance(len(entries), len(plans(state.epoch)), step)
        bar.update(1)
        shown = {k: f"{v / max(step['tokens'], 1):.3f}" for k, v in step["sums"].items() if k in _BAR_METRICS}
        bar.set_postfix({"loss": f"{step['loss']:.4f}", **shown, "lr": f"{step['lr']:.2e}",
                         "tok_s": f"{state.tokens_per_s():.0f}", "gnorm": f"{step['grad_norm']:.3f}"}, refresh=False)

        last = state.step == total_steps
        epoch_f = round(state.epoch + state.micro / max(len(plans(state.epoch)), 1), 4)
        if should_log(tc, state.step, epoch_done, last):
            metrics_log.log({"step": state.step, "epoch": epoch_f, **state.window_metrics()})
            state.reset_window()
        if prepared.eval and should_eval(tc, state.step, epoch_done, last):
            metrics_log.log({"step": state.step, "epoch": epoch_f, **run_eval()})
        if should_save(tc, state.step, epoch_done):
            with stop.saving():
                save(state)
            saved_step = state.step
        if distributed.sum_ints(int(stop.signum is not None))[0] and not last:  # any process got a signal
            bar.close()
            _stop_on_signal(stop, out, state, total_steps, metrics_log, save if saved_step != state.step else None)
    bar.close()

    # save
    final = _final_metrics(state, time.perf_counter() - started, metrics_log, run_eval if prepared.eval else None)
    with stop.saving():  # a signal during the final save is honoured once the run folder is complete
        distributed.on_main(save_run, out, cfg, model, tokenizer, prepared.stats, final, report)
    log.info("saved to %s", out)
    distributed.finish(created_group)
    fastpath.remove(model, fast)  # the user gets the model's own classes back (same parameters)
    return FinetuneResult(output_dir=out, metrics=final, model=model, tokenizer=tokenizer)


# --- the story's named steps ------------------------------------------------------------------------------------------


def _before_weights(cfg: RunConfig, out: Path, settings: dict, run_scope: ExitStack):
    """(checkpoint to resume from or None, tokenizer, prepared data): the output folder claimed and locked, the
    report_to packages found, the model source, data, tokenizer and every record checked. A run that fails here
    leaves no folder behind it created."""
    existed = out.exists()
    try:
        resume_from = distributed.on_main(prepare_output_dir, out, cfg.training_config, settings, run_scope)
        resolve_backends(cfg.training_config.report_to)
        tokenizer, prepared = checks_before_weights(cfg, distributed.is_main())
    except BaseException:
        if not existed and out.is_dir() and all(p.name == outdir.LOCK_NAME for p in out.iterdir()):
            (out / outdir.LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        raise
    return resume_from, tokenizer, prepared


def _already_complete(out: Path, tc: TrainingConfig, total_steps: int, created_group) -> FinetuneResult | None:
    """A resume of a run that already trained the steps asked for says so and trains nothing: its result (the
    run's final metrics), or None for a run to train."""
    done = finished_steps(out) if tc.resume_from_checkpoint else None
    if done is None or done < total_steps:
        return None
    log.warning("training_config.output_dir: the run in %s is complete (%d steps); nothing to resume. Raise "
                "max_steps or num_train_epochs to train further, or set overwrite_output_dir: true to start over",
                out, done)
    distributed.finish(created_group)
    return FinetuneResult(output_dir=out, metrics=json.loads((out / "final_metrics.json").read_text()))


def _model_with_lora(cfg: RunConfig, device: torch.device, tokenizer):
    """(model, tokenizer, LoRA report, FastPath): the base loaded, LoRA added (float32 factors even on a bf16 base),
    the same start on every process (FSDP2 if asked), gradient checkpointing, the fast path."""
    tc = cfg.training_config
    set_tf32(tc.tf32, device)
    empty = fsdp.loads_on_rank0(tc)  # FSDP: built on the meta device, rank 0 alone reads the weights
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, host_load=fsdp.fsdp_enabled(tc),
                                                tokenizer=tokenizer, bf16_autocast=tc.bf16, weights=not empty)
    report = add_lora(model, cfg.peft_config, lora_dtype=torch.float32)
    log.info("%s", report)
    checkpoint = functools.partial(checkpoint_files, cfg.model) if empty else None
    for note in fsdp.prepare_model(model, tc, device, checkpoint):
        log.info("%s", note)
    enable_gradient_checkpointing(model, tc)
    fast = loss.apply_fast_path(model, tc)
    for note in fast.notes:
        log.info("fast path: %s", note)
    distributed.seed_per_process(tc.seed)  # dropout masks differ between processes
    return model, tokenizer, report, fast


class EpochPlans:
    """``plans(epoch)``: the batch plan of an epoch (one on every process, micro-batches of the per-device batch x
    processes; each process trains on its part), built when first asked and kept while that epoch runs."""

    def __init__(self, samples, data_cfg, batch_size: int, accumulation: int, pairs: bool = False):
        self.samples, self.data_cfg, self.batch_size, self.pairs = samples, data_cfg, batch_size, pairs
        self._epoch, self._plan = None, None
        self.steps_per_epoch = math.ceil(len(self(0)) / accumulation)
        if self.steps_per_epoch == 0:
            raise PhituneError("the training data gave no batches: check data.train and data.max_seq_length")

    def __call__(self, epoch: int) -> list:
        if epoch != self._epoch:
            dc = self.data_cfg
            if self.pairs:  # preference pairs: batch_size pairs per micro-batch, never packed
                self._plan = pair_plan(self.samples, self.batch_size, dc.seed, epoch)
            else:
                self._plan = batch_plan(self.samples, self.batch_size, dc.max_seq_length, dc.packing, dc.seed,
                                        epoch)
            self._epoch = epoch
        return self._plan


def _resume(resume_from: Path | None, cfg: RunConfig, model, optimizer, scheduler, scaler, world: int,
            total_steps: int):
    """(TrainState, config as it really trains, the checkpoint's extra state): a fresh start, or the checkpoint's
    position after restoring model, optimizer, schedule and RNG states."""
    if resume_from is None:
        return TrainState(), cfg, {}
    saved = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                 rank=distributed.rank(), world_size=world)
    state = TrainState.from_dict(saved["extra"]["train_state"])
    log.info("resumed from %s (step %d of %d)", resume_from, state.step, total_steps)
    return state, _kept_from_checkpoint(cfg, optimizer), saved["extra"]


def _reference_log_probs(cfg: RunConfig, model, tokenizer, prepared, fast, autocast, saved: dict) -> dict:
    """precompute_ref_log_probs: {"train": ..., "eval": ...} reference log-probs of every sample (adapters off),
    taken from the checkpoint being resumed (``saved``: its extra state), so the resumed run uses the very numbers
    it started with, or computed once now; {} when the reference runs with every micro-batch."""
    tc = cfg.training_config
    if not tc.precompute_ref_log_probs:
        return {}
    if saved.get("reference_logps"):
        return {k: v.double().numpy() for k, v in saved["reference_logps"].items()}
    splits = {"train": prepared.train, **({"eval": prepared.eval} if prepared.eval else {})}
    started = time.perf_counter()
    with autocast:
        tables = {k: preference.reference_table(model, v, cfg.data, tc.per_device_eval_batch_size, tokenizer, fast)
                  for k, v in splits.items()}
    log.info("reference log-probs of %s samples precomputed in %.1f s",
             " + ".join(str(len(v)) for v in tables.values()), time.perf_counter() - started)
    return tables


def _log_plan(tc: TrainingConfig, total_steps: int, steps_per_epoch: int, world: int, prepared) -> None:
    what = "sequences" if prepared.kind == "chats" else "pairs"
    log.info("training %d steps (%d per epoch; %d %s x %d accumulation%s), %d train samples, %d eval samples",
             total_steps, steps_per_epoch, tc.per_device_train_batch_size, what, tc.gradient_accumulation_steps,
             f" x {world} processes" if world > 1 else "", len(prepared.train), len(prepared.eval or []))


def _final_metrics(state: "TrainState", runtime_s: float, metrics_log: MetricsLog, run_eval) -> dict:
    """train_loss/steps/tokens/runtime, and the eval numbers of the last evaluation (run now if the loop's last
    step did not evaluate; ``run_eval`` None: no eval data). Closes the metrics log."""
    counted = "train_tokens" if state.unit == "supervised_tokens" else f"train_{state.unit}"
    final = {"train_loss": state.mean_loss(), "train_steps": state.step, counted: state.total_tokens,
             "train_runtime_s": round(runtime_s, 2)}
    if run_eval is not None:
        last_eval = distributed.on_main(logged_eval, metrics_log.path, state.step)
        final.update({k: v for k, v in (last_eval or run_eval()).items() if k.startswith("eval_")})
    metrics_log.close()
    return final


def _evaluator(model, tokenizer, prepared, cfg: RunConfig, fast, autocast, reference=None):
    """``run_eval() -> metrics``: eval loss/perplexity/accuracy (preference runs: loss and TRL's rewards/logps
    metrics over the eval pairs), plus the eval_generate answers when asked (preference runs: to the eval pairs'
    prompts, the chosen reply as the reference)."""
    tc = cfg.training_config
    probe = generation_probe(model, tokenizer, prepared, cfg.data, tc)  # preference runs: the eval pairs' prompts

    def run_eval() -> dict[str, float]:
        with autocast:
            if prepared.kind == "pairs":
                metrics = preference.evaluate_pairs(model, prepared.eval, cfg.data, tc.per_device_eval_batch_size,
                                                    tc, tokenizer=tokenizer, fast=fast, reference=reference)
            else:
                metrics = evaluate_samples(model, prepared.eval, cfg.data, tc.per_device_eval_batch_size,
                                           tokenizer=tokenizer, fast=fast)
            return {**metrics, **probe()}

    return run_eval


def _stop_on_signal(stop: StopOnSignal, out: Path, state: "TrainState", total_steps: int, metrics_log, save) -> None:
    """After SIGINT/SIGTERM: a checkpoint at this step (``save``; None when one was just written), then
    ``Interrupted`` carrying the exit code and the checkpoint."""
    if save is not None:
        with stop.saving():
            save(state)
    metrics_log.close()
    signum = stop.signum or signal.SIGTERM
    where = ckpt.checkpoints_dir(out) / f"{ckpt.PREFIX}{state.step}"
    raise Interrupted(signum, f"stopped by {signal_name(signum)} after step {state.step} of {total_steps}; "
                      f"checkpoint saved to {where}. Resume with training_config.resume_from_checkpoint: auto",
                      checkpoint=where, output_dir=out)


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


def save_checkpoint(out: Path, state: "TrainState", model, optimizer, scheduler, scaler, settings: dict,
                    cfg: RunConfig, reference: dict | None = None) -> None:
    """Write checkpoint-STEP and apply save_total_limit, on rank 0 (with every process's RNG state and the
    precomputed reference log-probs, if any)."""
    rng_per_process = distributed.gather_objects(ckpt.rng_state())  # None in one process
    extra = {"train_state": state.to_dict()}
    if reference:
        extra["reference_logps"] = {k: torch.from_numpy(v) for k, v in reference.items()}

    def write():
        saved = ckpt.save_checkpoint(out, state.step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     data_position={"epoch": state.epoch, "micro_batch": state.micro},
                                     settings=settings, base_model_name_or_path=cfg.model.name_or_path,
                                     scaler=scaler, extra=extra,
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
            skip = value.keys_not_read() if hasattr(value, "keys_not_read") else ()
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                     if f.init and f.name != "notes" and f.name not in skip}
        out[name] = value
    return out


# --- seed, optimizer, schedule, precision -----------------------------------------------------------------------------


# --- one optimizer step -----------------------------------------------------------------------------------------------


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
