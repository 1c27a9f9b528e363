"""Where the training loop is and when it acts: ``TrainState`` (the loop position and running sums, saved in every
checkpoint so that a resumed run logs the same numbers) and the log/eval/save schedule (``should_log``,
``should_eval``, ``should_save``) that ``train.py``'s loop asks at every step boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import TrainingConfig


@dataclass
class TrainState:
    """Loop position and running sums; saved in every checkpoint so that a resumed run logs the same numbers."""

    step: int = 0
    epoch: int = 0
    unit: str = "supervised_tokens"  # what a step's loss is divided by: supervised_tokens, or pairs (preference)
    micro: int = 0  # next micro-batch of the epoch's plan
    total_loss_sum: float = 0.0
    total_tokens: int = 0
    window_loss_sum: float = 0.0
    window_tokens: int = 0
    window_steps: int = 0
    window_grad_norm: float = 0.0
    window_lr: float = 0.0
    window_sums: dict = field(default_factory=dict)  # sums of the forward's metrics (preference: rewards/chosen...)
    _window_start: float = field(default_factory=time.perf_counter, repr=False)
    _window_input_tokens: int = 0

    def advance(self, micro_batches: int, plan_length: int, step: dict) -> bool:
        """Count one optimizer step over ``micro_batches`` of an epoch's plan and add its sums; True when the step
        finished the epoch (the next one starts at its first micro-batch)."""
        self.step += 1
        self.micro += micro_batches
        epoch_done = self.micro >= plan_length
        if epoch_done:
            self.epoch, self.micro = self.epoch + 1, 0
        self.add(step)
        return epoch_done

    def add(self, s: dict) -> None:
        self.total_loss_sum += s["loss_sum"]
        self.total_tokens += s["tokens"]
        self.window_loss_sum += s["loss_sum"]
        self.window_tokens += s["tokens"]
        self.window_steps += 1
        self.window_grad_norm += s["grad_norm"]
        self.window_lr = s["lr"]
        self._window_input_tokens += s["input_tokens"]
        for key, value in s.get("sums", {}).items():
            self.window_sums[key] = self.window_sums.get(key, 0.0) + value

    def tokens_per_s(self) -> float:
        return self._window_input_tokens / max(time.perf_counter() - self._window_start, 1e-9)

    def window_metrics(self) -> dict[str, float]:
        return {"loss": self.window_loss_sum / max(self.window_tokens, 1),
                "lr": self.window_lr,
                "grad_norm": self.window_grad_norm / max(self.window_steps, 1),
                "tokens_per_s": round(self.tokens_per_s(), 1),
                self.unit: self.window_tokens,
                **{k: v / max(self.window_tokens, 1) for k, v in self.window_sums.items()}}

    def reset_window(self) -> None:
        self.window_loss_sum, self.window_tokens, self.window_steps, self.window_grad_norm = 0.0, 0, 0, 0.0
        self._window_start, self._window_input_tokens = time.perf_counter(), 0
        self.window_sums = {}

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


