"""The `classifier:` section of `corpus clean` configs (also the options of `corpus annotate --classifier`)."""

from __future__ import annotations

from pydantic import Field

from hibari.config import StrictModel

SCORE_FIELD = "quality_score"  # record key of the classifier's score on every kept / annotated document


class ClassifierConfig(StrictModel):
    # model dir written by `hibari corpus classifier train`; null = no classifier stage
    model: str | None = None
    # keep iff score >= threshold (score = probability of the model's positive class)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    # documents per batched scoring call
    batch_size: int = Field(256, ge=1)
