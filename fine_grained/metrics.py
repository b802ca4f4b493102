"""The three fine-grained metrics, as functions of (scores (N, K), targets) -> percent.

scores are decision values (higher = more likely); targets are class ids (N,) or, for VOC, a 0/1
matrix (N, K).
"""
import torch


def top1_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Percentage of samples whose highest-scoring class is the target."""
    return 100.0 * float((scores.argmax(dim=1) == targets).float().mean())


def mean_per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes of the per-class recall (confusion-matrix diagonal / row sums).

    Classes absent from `targets` are skipped (their row sum is 0), as the original's nan-free mean of
    the rows that exist.
    """
    pred = scores.argmax(dim=1)
    num_classes = scores.shape[1]
    per_class_total = torch.bincount(targets, minlength=num_classes).float()
    per_class_hit = torch.bincount(targets[pred == targets], minlength=num_classes).float()
    present = per_class_total > 0
    return 100.0 * float((per_class_hit[present] / per_class_total[present]).mean())


def precision_recall(scores: torch.Tensor, positives: torch.Tensor):
    """Precision and recall at every distinct score threshold, plus the (recall 0, precision 1) end point.

    Same points as sklearn's `precision_recall_curve`, which the original code used: tied scores form one
    threshold, and the curve ends with precision 1 at recall 0.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order].double(), positives[order].double()
    tp, fp = torch.cumsum(y, 0), torch.cumsum(1 - y, 0)
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]  # a threshold takes every sample scored >= it
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / y.sum() if y.sum() > 0 else torch.zeros_like(tp)
    return torch.cat([precision, precision.new_ones(1)]), torch.cat([recall, recall.new_zeros(1)])


def voc11_average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """VOC2007's 11-point interpolated AP of one class (fraction, 0..1).

    For t in {0, 0.1, ..., 1}: the highest precision among points with recall >= t (0 if none); mean of 11.
    """
    precision, recall = precision_recall(scores, positives)
    points = []
    for t in torch.linspace(0, 1, 11, dtype=torch.float64):
        ok = recall >= t - 1e-12  # linspace(0, 1, 11) is not exact in binary: 0.3 is 0.30000000000000004
        points.append(float(precision[ok].max()) if ok.any() else 0.0)
    return sum(points) / 11.0


def voc_mean_ap(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes of the 11-point AP, in percent; scores and targets are (N, K)."""
    aps = [voc11_average_precision(scores[:, k], targets[:, k]) for k in range(targets.shape[1])]
    return 100.0 * sum(aps) / len(aps)


METRICS = {
    "accuracy": top1_accuracy,
    "mean_per_class_accuracy": mean_per_class_accuracy,
    "voc_map_11pt": voc_mean_ap,
}
