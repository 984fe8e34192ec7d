"""The classifier stage of `corpus clean`: scores documents in batches and drops those below the threshold.

`ClassifierFilter` is a corpus Step (same counters, funnel row and drop-ledger entry as the rule stages). The clean
loop hands it the pages that survived every other stage in batches (`score_batch`), then passes each page through
it as usual; a page that arrives unscored (used on its own) is scored alone.
"""

from __future__ import annotations

from data_pipeline.classifier.config import SCORE_FIELD, ClassifierConfig
from data_pipeline.classifier.model import QualityClassifier
from data_pipeline.corpus.steps import Step


class ClassifierFilter(Step):
    name = "classifier"
    batched = True  # the clean loop scores the survivors of the earlier stages `batch_size` at a time

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.threshold = cfg.threshold
        self.batch_size = cfg.batch_size
        self.model = QualityClassifier.load(cfg.model)  # HibariError naming the dir/file when it is not a model
        self.reason = f"{SCORE_FIELD}<{self.threshold:g}"

    def score_batch(self, pages) -> None:
        """Score `pages` in one call; each page carries its score (`page.scores`) into `apply` and its record."""
        for page, score in zip(pages, self.model.score([p.text for p in pages]).tolist()):
            page.scores = {SCORE_FIELD: round(score, 5)}

    def apply(self, page):
        if getattr(page, "scores", None) is None:
            self.score_batch([page])
        score = page.scores[SCORE_FIELD]
        if score >= self.threshold:
            return None
        return self.reason, f"{SCORE_FIELD}={score:.4f} < {self.threshold:g}"

