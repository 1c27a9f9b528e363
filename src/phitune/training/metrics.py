"""Where training metrics go: the progress bar, ``metrics.jsonl``, TensorBoard / W&B / MLflow, the loss curve.

``MetricsLog.log(record)`` appends one JSON line per logging or evaluation step and forwards the numbers to the
``report_to`` backends that are installed (a clear error names the missing package before training starts).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ..config import REPORT_BACKENDS
from ..errors import ConfigError

log = logging.getLogger("phitune")

METRICS_NAME = "metrics.jsonl"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def setup_logging(level: str = "passive") -> None:
    """Give the ``phitune`` logger a handler (unless the application configured one) at ``level``."""
    level = "info" if level == "passive" else level
    if not log.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("phitune: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def resolve_backends(report_to: list[str]) -> list[str]:
    """The backends to use; ``all`` means every installed one. A named backend that is not installed is an error."""
    if report_to == ["all"]:
        return [b for b in REPORT_BACKENDS if importlib.util.find_spec(_PACKAGES[b]) is not None]
    for name in report_to:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"training_config.report_to: {name} is not installed; `pip install phitune[{name}]` "
                              f"(or `pip install {_PACKAGES[name]}`), or remove it from report_to")
    return list(report_to)


class MetricsLog:
    """metrics.jsonl plus the report_to backends. ``write=False`` (processes other than rank 0): logs nothing."""

    def __init__(self, output_dir: str | Path, report_to: list[str], *, run_name: str, config: dict,
                 resume_step: int | None = None, write: bool = True):
        self.path = Path(output_dir) / METRICS_NAME
        self.write = write
        self._tb = self._wandb = self._mlflow = None
        if not write:
            self.backends = []
            return
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            self._truncate_after(resume_step)
        self.backends = resolve_backends(report_to)
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))
        if "wandb" in self.backends:
            import wandb

            self._wandb = wandb.init(name=run_name, config=config, dir=str(output_dir),
                                     resume="allow" if resume_step is not None else None)
        if "mlflow" in self.backends:
            import mlflow

            mlflow.start_run(run_name=run_name)
            self._mlflow = mlflow
            flat = {f"{s}.{k}": v for s, sec in config.items() if isinstance(sec, dict) for k, v in sec.items()}
            mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a killed run may have logged steps the resumed run will log again."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log.info("%s", format_record(record))
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in numbers.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def format_record(record: dict[str, Any]) -> str:
    """``step 20 (epoch 0.31): loss 1.234  lr 2.00e-04  grad_norm 0.51  tokens_per_s 2048``."""
    parts = []
    for k, v in record.items():
        if k in ("step", "epoch") or isinstance(v, (list, dict)):  # generated answers: one line each, below
            continue
        if isinstance(v, float):
            v = f"{v:.2e}" if k == "lr" else f"{v:.4g}"
        parts.append(f"{k} {v}")
    line = f"step {record.get('step')} (epoch {record.get('epoch', 0):.2f}): " + "  ".join(parts)
    for g in record.get("generations") or []:  # training_config.eval_generate
        answer = " ".join(str(g.get("answer", "")).split())
        answer = answer if len(answer) <= 100 else answer[:97] + "..."
        line += f"\n  eval #{g.get('index')}{' (exact)' if g.get('exact_match') else ''}: {answer}"
    return line


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss_curve(records: list[dict[str, Any]], png_path: str | Path) -> Path | None:
    """Train loss (and eval loss, when there is any) against the optimizer step, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr)
