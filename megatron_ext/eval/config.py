"""`eval:` section of a training config: downstream tasks run on rank 0 at checkpoint steps (pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hibari.config import StrictModel


class EvalConfig(StrictModel):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names, e.g. [hibari_ja_mc]")
    interval: int = Field(0, ge=0, description="evaluate the checkpoint saved every N steps (a multiple of "
                                               "checkpoint.interval) and the final one; 0: never")
    tokenizer: str | None = Field(None, description="HF tokenizer directory (required with tasks)")
    task_dirs: list[str] = Field(default_factory=list, description="folders of lm-eval task YAML files")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1, description="first N documents of each task")
    batch_size: int = Field(8, ge=1)
    device: str = Field("cpu", description="torch device of the evaluation copy of the model (rank 0)")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    @property
    def enabled(self) -> bool:
        return bool(self.tasks) and self.interval > 0

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and not self.tokenizer:
            raise ValueError("eval.tasks needs eval.tokenizer (an HF tokenizer directory)")
        return self
