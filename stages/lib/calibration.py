"""Whether the model's confidence means what it says: expected calibration error, negative
log-likelihood, Brier score, the reliability table behind the diagram, and temperature scaling.

A network fine-tuned with cross-entropy tends to be over-confident. Temperature scaling (Guo et
al., 2017) divides the logits by one scalar T fitted on the val split: the predicted classes stay
the same, only the confidences move, so accuracy is untouched and the probabilities become usable
for abstaining (predict --min-confidence).
"""

from __future__ import annotations

import numpy as np

BINS = 15  # equal-width confidence bins, as Guo et al.


def reliability_table(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin (top-label): its range, images, mean confidence and accuracy."""
    confidence, right = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # confidence 1.0 goes in the last bin
    table = []
    for b in range(bins):
        inside = which == b
        table.append({"bin_low": b / bins, "bin_high": (b + 1) / bins, "images": int(inside.sum()),
                      "confidence": float(confidence[inside].mean()) if inside.any() else None,
                      "accuracy": float(right[inside].mean()) if inside.any() else None})
    return table


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (share of images) x |accuracy - mean confidence|."""
    n = len(labels)
    return float(sum(row["images"] / n * abs(row["accuracy"] - row["confidence"])
                     for row in reliability_table(probs, labels, bins) if row["images"]))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot truth."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1
    return float(((probs - onehot) ** 2).sum(1).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: softmax(log p / T), the same as softmax(logits / T)
    without test-time augmentation; the most probable class does not change."""
    if temperature == 1.0:
        return probs
    return softmax(np.log(np.maximum(probs, 1e-12)) / temperature)


# Beyond these a temperature says more about the images it was fitted on than about the model:
# 0.1 raises every probability to the 10th power. Fitted on 30 val images or more it stays within
# 0.3 to 0.8 on the three archives (bench.temperature).
TEMPERATURE_RANGE = (0.1, 10.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the NLL of softmax(logits / T): a golden-section search
    on log T, on which the NLL is unimodal; deterministic, milliseconds on cached logits."""
    def nll(log_t: float) -> float:
        return negative_log_likelihood(softmax(logits / np.exp(log_t)), labels)

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    for _ in range(80):
        if nll(a) < nll(b):
            high, b = b, a
            a = high - ratio * (high - low)
        else:
            low, a = a, b
            b = low + ratio * (high - low)
    return float(round(np.exp((low + high) / 2), 6))
