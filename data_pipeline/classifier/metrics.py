"""Held-out metrics of a binary scorer: accuracy and F1 at a threshold, ROC AUC from ranks."""

from __future__ import annotations

import numpy as np


def roc_auc(scores, labels) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2), computed with the
    Mann-Whitney rank-sum formula in O(n log n). NaN when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # average rank (1-based) of each group of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(scores, labels, threshold: float = 0.5) -> dict:
    """accuracy, precision, recall, F1 (of the positive class) at `threshold`, and ROC AUC."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"documents": int(len(labels)), "positives": int(labels.sum()), "threshold": threshold,
            "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
            "precision": precision, "recall": recall, "f1": f1, "roc_auc": roc_auc(scores, labels)}
