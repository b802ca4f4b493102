"""DINO's weighted kNN on frozen features: cosine similarity, k nearest neighbours weighted by exp(sim / T)."""
import torch
import torch.nn.functional as F

from common.probe import extract_features
from linear_eval.grid import topk_correct


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Class scores (N_test, C) of DINO's weighted kNN vote; features are L2-normalised here."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T  # (b, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_eval(backbone, train_loader, test_loader, num_classes: int, device, ks=(10, 20), temperature=0.07,
             autocast_dtype=None) -> dict:
    """DINO's weighted kNN on the final normed CLS token: top-1/top-5 (%) for each k."""
    train = extract_features(backbone, train_loader, device, n_last_blocks=1, autocast_dtype=autocast_dtype,
                             desc="features train")
    test = extract_features(backbone, test_loader, device, n_last_blocks=1, autocast_dtype=autocast_dtype,
                            desc="features val")
    bank, labels = train["cls"][:, -1].to(device), train["targets"].to(device)  # (N, D), (N,)
    queries, targets = test["cls"][:, -1].to(device), test["targets"].to(device)
    out = {}
    for k in ks:
        scores = knn_classify(bank, labels, queries, num_classes, k=k, temperature=temperature)
        top1, top5 = topk_correct(scores, targets)
        out[f"k{k}"] = {"top1": 100.0 * top1 / len(targets), "top5": 100.0 * top5 / len(targets)}
    return out
