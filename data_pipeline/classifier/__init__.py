"""Document quality classifier (the Swallow Corpus v2 step): hashed character n-grams + logistic regression.

    QualityClassifier.load(model_dir).score(texts) -> np.ndarray of P(positive class), batched
    ClassifierFilter(cfg)  # the `classifier:` stage of corpus clean / annotate (data_pipeline.classifier.step)
    train_classifier / train_from_sources / evaluate (data_pipeline.classifier.train)
"""

from data_pipeline.classifier.features import FeatureConfig, featurize
from data_pipeline.classifier.metrics import binary_metrics, roc_auc
from data_pipeline.classifier.model import QualityClassifier, TrainConfig, fit

__all__ = ["FeatureConfig", "featurize", "binary_metrics", "roc_auc", "QualityClassifier", "TrainConfig", "fit"]
