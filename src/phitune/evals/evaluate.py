"""``phitune eval``: a run folder (or one of its checkpoints) scored on its eval data: loss and perplexity, and with
``generate=True`` answers generated and scored, optionally against the base model (adapters off).

    metrics = phitune.evaluate("runs/phi3-lora")   # {"eval_loss": ..., "eval_perplexity": ...}
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from ..data.preference import ChosenReplies, prepare_run_data
from ..errors import ConfigError, DataError
from ..generation.loop import GenerationSettings
from ..generation.stops import stop_token_ids
from ..lora import disable_adapters
from ..runs.folder import load_run_config, load_run_model, load_run_tokenizer, open_run
from ..training.evaluation import evaluate_samples
from ..training.preference import evaluate_pairs
from ..training.metrics import METRICS_NAME, read_metrics
from ..training.optim import autocast_context
from .generation import EVAL_DIR, evaluate_samples_by_generation, flat_metrics
from .prompts import generation_samples
from .scores import load_metric

# --- evaluate -------------------------------------------------------------------------------------------------------


def evaluate(
    run_dir: str | os.PathLike,
    data: Any = None,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    device: str | None = None,
    verbose: bool = True,
    trust_remote_code: bool = False,
    generate: bool = False,
    compare_base: bool = False,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    metric: Any = None,
) -> dict[str, Any]:
    """Loss, perplexity and token accuracy of a run's adapter model; with ``generate``, its answers too.

    ``data``: None uses the run's eval data (``data.eval`` or the ``data.eval_split`` held out of train); otherwise a
    source as ``data.train`` accepts (file, folder, Hub name, list of records), prepared with the run's data settings
    (chat template, max_seq_length, train_on, packing). Only trained tokens count (assistant turns by default).
    Returns ``{"eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_tokens", "eval_samples"}``.

    ``generate=True`` (phitune.evaluate): the model answers every conversation's last assistant turn from the turns
    before it (greedy; sampled when ``temperature`` or ``top_p`` is given), scored against it (exact match, token F1,
    ROUGE-L, length, ended its turn; ``metric``: custom ``(prediction, reference) -> float`` functions or
    ``"module:function"`` strings); ``compare_base=True`` also asks the base model (the LoRA layers switched off in
    the same model). Adds ``gen_*`` (and ``base_gen_*``, ``base_eval_loss``) numbers and the paths of
    ``RUN_DIR/eval/report.html`` and ``eval/samples.jsonl`` (``report``, ``samples_file``) to the result.
    ``trust_remote_code``: allow the code of a run whose config asks for it (see :func:`load_run_config`).
    """
    run = open_run(run_dir)  # before any slow import or load
    config = load_run_config(run.root, trust_remote_code=trust_remote_code)
    settings, metric_fns = _generation_options(config, generate, compare_base, max_new_tokens, temperature, top_p,
                                               seed, metric)
    data_cfg = config.data
    if data is not None:
        data_cfg = dataclasses.replace(data_cfg, train=data, eval=None, eval_split=None)
    elif data_cfg.eval is None and not data_cfg.eval_split:
        raise ConfigError(
            f"run '{run.root}' has no eval data (its config sets neither data.eval nor data.eval_split): "
            "pass a data source, e.g. `phitune eval RUN_DIR --data eval.jsonl` or evaluate(run_dir, data=...)"
        )

    tokenizer = load_run_tokenizer(run.root, config)
    tc = config.training_config
    pairs = tc.method != "sft"
    if data_cfg.chat_template:  # training saved it with the tokenizer: its text, even if the file is gone now
        data_cfg = dataclasses.replace(data_cfg, chat_template=tokenizer.chat_template)
    prepared = prepare_run_data(data_cfg, tokenizer, tc)  # preference runs: pairs; the chosen reply is the reference
    samples = prepared.train if data is not None else prepared.eval
    if generate and pairs:
        gen_samples = ChosenReplies(samples)
    elif generate:  # the prompts: the prepared conversations up to their last assistant turn
        gen_samples = generation_samples(prepared, data_cfg, tokenizer, "train" if data is not None else "eval")
    limit = max_samples * 2 if pairs and max_samples is not None else max_samples  # a pair is two samples
    if samples is not None and limit is not None and limit < len(samples):
        samples = samples[:limit]
    if samples is None or len(samples) == 0:
        raise DataError(f"no samples to evaluate on ({'the given data' if data is not None else 'the eval data'} "
                        "is empty after preparation)")
    batch_size = batch_size or config.training_config.per_device_eval_batch_size

    model, tokenizer, _ = load_run_model(run.adapter_dir, device=device, trust_remote_code=trust_remote_code)
    device_ = next(model.parameters()).device
    if verbose:
        print(f"evaluating {run.adapter_dir} on {len(samples) // 2 if pairs else len(samples)} "
              f"{'pairs' if pairs else 'samples'} ({'given data' if data is not None else 'the run eval data'})",
              file=sys.stderr)

    def score() -> dict:
        if pairs:
            return evaluate_pairs(model, samples, data_cfg, batch_size, tc, tokenizer=tokenizer)
        return evaluate_samples(model, samples, data_cfg, batch_size, tokenizer=tokenizer)

    with autocast_context(config.training_config, device_):  # the precision training evaluated with
        metrics = score()
    metrics["eval_samples"] = len(samples)
    if not generate:
        return metrics

    base_metrics = None
    with autocast_context(config.training_config, device_):
        if compare_base:
            with disable_adapters(model):
                base_metrics = score()
            if pairs:
                metrics["base_eval_preference_accuracy"] = base_metrics["eval_preference_accuracy"]
        result = evaluate_samples_by_generation(
            model, tokenizer, gen_samples, stop_ids=stop_token_ids(tokenizer, run_dir=run.root, model=model),
            settings=settings, batch_size=batch_size, max_samples=max_samples, compare_base=compare_base,
            metrics=metric_fns, eval_metrics=metrics, base_eval_metrics=base_metrics,
            out_dir=run.adapter_dir / EVAL_DIR, train_records=read_metrics(run.root / METRICS_NAME),
            title=str(run.adapter_dir), progress=verbose)
    metrics.update(flat_metrics(result.summary))
    metrics["report"] = str(result.report_path)
    metrics["samples_file"] = str(result.samples_path)
    return metrics


def _generation_options(config, generate: bool, compare_base: bool, max_new_tokens: int, temperature, top_p, seed,
                        metric):
    """The generation settings and custom metric functions, checked before anything slow (None when not
    generating; generation-only options without ``generate`` are an error)."""
    if not generate:
        given = [name for name, v in (("--compare-base", compare_base), ("--temperature", temperature),
                                      ("--top-p", top_p), ("--metric", metric)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to generation: add --generate (generate=True)")
        return None, []

    sampling = temperature is not None or top_p is not None
    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=not sampling,
                                  temperature=1.0 if temperature is None else temperature,
                                  top_p=1.0 if top_p is None else top_p, seed=seed)
    specs = [] if metric is None else [metric] if isinstance(metric, str) or callable(metric) else list(metric)
    metric_fns = [load_metric(m) for m in specs]
    pc = config.peft_config
    if compare_base and (pc.modules_to_save or pc.bias != "none"):
        what = "modules_to_save" if pc.modules_to_save else f"bias: {pc.bias}"
        raise ConfigError(f"--compare-base: this run trained weights of the base model itself (peft_config {what}), "
                          "so switching the LoRA layers off does not give the base model back; evaluate the base "
                          "model on its own instead")
    return settings, metric_fns
