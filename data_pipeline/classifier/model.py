"""The quality classifier: logistic regression over hashed character n-grams, trained full-batch in numpy.

A model directory holds `features.json` (feature settings), `model.json` (labels, bias, training summary) and
`weights.npy` (float32 weights, loaded with `allow_pickle=False`): nothing in it is unpickled, so a swapped file
can be wrong but cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.classifier.features import DENSE_FEATURES, FeatureConfig, SparseBatch, featurize
from hibari.errors import HibariError
from hibari.io import atomic_write, read_json_object, write_json

FORMAT = "hibari-quality-classifier/1"
FEATURES_FILE, MODEL_FILE, WEIGHTS_FILE = "features.json", "model.json", "weights.npy"


@dataclass
class TrainConfig:
    # chosen on the labelled mC4 set (5 seeded 80/20 splits; bench/results/classifier.md)
    epochs: int = 150
    learning_rate: float = 0.1
    l2: float = 1e-4           # on the mean log loss
    balance_classes: bool = True  # weight each class to half of the loss, whatever its share of the data


@dataclass
class QualityClassifier:
    features: FeatureConfig
    weights: np.ndarray         # float32 [buckets]
    dense_weights: np.ndarray   # float64 [len(DENSE_FEATURES)]
    dense_mean: np.ndarray      # standardisation of the dense features (from the training set)
    dense_scale: np.ndarray
    bias: float
    positive_label: str = "good"
    negative_label: str = "bad"
    info: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- scoring
    def logits(self, batch: SparseBatch) -> np.ndarray:
        dense = (batch.dense - self.dense_mean) / self.dense_scale
        return SparseBatch(batch.n_docs, batch.doc, batch.col, batch.val, dense).dot(
            self.weights, self.dense_weights) + self.bias

    def score(self, texts: list[str]) -> np.ndarray:
        """Probability that each text is of the positive class (float64 in [0, 1]), batched."""
        return sigmoid(self.logits(featurize(list(texts), self.features)))

    # ---------------------------------------------------------------- files
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / FEATURES_FILE, {"format": FORMAT, **self.features.to_json(),
                                         "dense_features": list(DENSE_FEATURES)}, indent=1)
        with atomic_write(out / WEIGHTS_FILE, "wb") as f:
            np.save(f, self.weights.astype(np.float32), allow_pickle=False)
        write_json(out / MODEL_FILE, {
            "format": FORMAT, "positive_label": self.positive_label, "negative_label": self.negative_label,
            "bias": float(self.bias), "dense_weights": self.dense_weights.tolist(),
            "dense_mean": self.dense_mean.tolist(), "dense_scale": self.dense_scale.tolist(), **self.info,
        }, indent=1)
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> "QualityClassifier":
        root = Path(model_dir)
        if not root.is_dir():
            raise HibariError(f"classifier model {root}: no such directory (expected the --out of "
                              "`hibari corpus classifier train`)")
        for name in (FEATURES_FILE, MODEL_FILE, WEIGHTS_FILE):
            if not (root / name).is_file():
                raise HibariError(f"classifier model {root}: missing {name} (expected {FEATURES_FILE}, "
                                  f"{MODEL_FILE}, {WEIGHTS_FILE} from `hibari corpus classifier train`)")
        feats = read_json_object(root / FEATURES_FILE, "classifier model")
        meta = read_json_object(root / MODEL_FILE, "classifier model")
        for name, data in ((FEATURES_FILE, feats), (MODEL_FILE, meta)):
            if data.get("format") != FORMAT:
                raise HibariError(f"classifier model {root / name}: format {data.get('format')!r}, "
                                  f"expected {FORMAT!r}")
        if feats.get("dense_features") != list(DENSE_FEATURES):
            raise HibariError(f"classifier model {root / FEATURES_FILE}: dense_features "
                              f"{feats.get('dense_features')!r}, this version computes {list(DENSE_FEATURES)}")
        try:
            cfg = FeatureConfig(**{k: feats[k] for k in ("min_n", "max_n", "bucket_bits", "fold_width", "lowercase")})
        except (KeyError, TypeError, ValueError) as err:
            raise HibariError(f"classifier model {root / FEATURES_FILE}: bad feature settings ({err})") from None
        try:
            weights = np.load(root / WEIGHTS_FILE, allow_pickle=False)
        except ValueError as err:
            raise HibariError(f"classifier model {root / WEIGHTS_FILE}: not a numpy array file ({err})") from None
        if weights.shape != (cfg.buckets,) or not np.issubdtype(weights.dtype, np.floating):
            raise HibariError(f"classifier model {root / WEIGHTS_FILE}: shape {weights.shape} {weights.dtype}, "
                              f"expected ({cfg.buckets},) float for bucket_bits {cfg.bucket_bits}")
        try:
            dense = [np.asarray(meta[k], dtype=np.float64) for k in ("dense_weights", "dense_mean", "dense_scale")]
            bias = float(meta["bias"])
            labels = str(meta["positive_label"]), str(meta["negative_label"])
        except (KeyError, TypeError, ValueError) as err:
            raise HibariError(f"classifier model {root / MODEL_FILE}: missing or bad field ({err})") from None
        if any(d.shape != (len(DENSE_FEATURES),) for d in dense):
            raise HibariError(f"classifier model {root / MODEL_FILE}: dense weights need "
                              f"{len(DENSE_FEATURES)} values each")
        info = {k: v for k, v in meta.items() if k not in ("format", "positive_label", "negative_label", "bias",
                                                           "dense_weights", "dense_mean", "dense_scale")}
        return cls(cfg, weights.astype(np.float64), *dense, bias, *labels, info=info)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def fit(batch: SparseBatch, labels: np.ndarray, features: FeatureConfig, train: TrainConfig,
        positive_label: str = "good", negative_label: str = "bad", on_epoch=None) -> QualityClassifier:
    """Minimise the (class-weighted) mean log loss + l2/2 |w|^2 with full-batch Adam: deterministic (no sampling),
    and at corpus-classifier sizes (1e3-1e6 documents) a few hundred epochs of two bincounts each."""
    y = np.asarray(labels, dtype=np.float64)
    n = len(y)
    if train.balance_classes:
        n_pos = y.sum()
        sample_w = np.where(y > 0, 0.5 / n_pos, 0.5 / (n - n_pos))
    else:
        sample_w = np.full(n, 1.0 / n)
    mean = batch.dense.mean(axis=0)
    scale = batch.dense.std(axis=0)
    scale[scale == 0] = 1.0
    std_batch = SparseBatch(n, batch.doc, batch.col, batch.val, (batch.dense - mean) / scale)
    buckets = features.buckets
    params = [np.zeros(buckets), np.zeros(batch.dense.shape[1]), np.zeros(1)]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for epoch in range(1, train.epochs + 1):
        w, dw, b = params
        p = sigmoid(std_batch.dot(w, dw) + b[0])
        residual = (p - y) * sample_w
        g_sparse, g_dense = std_batch.t_dot(residual, buckets)
        grads = [g_sparse + train.l2 * w, g_dense + train.l2 * dw, np.array([residual.sum()])]
        for param, grad, (m, v) in zip(params, grads, moments):
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            m_hat = m / (1 - beta1 ** epoch)
            v_hat = v / (1 - beta2 ** epoch)
            param -= train.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
        if on_epoch is not None:
            on_epoch()
    w, dw, b = params
    return QualityClassifier(features, w.astype(np.float32).astype(np.float64), dw, mean, scale, float(b[0]),
                             positive_label, negative_label)
