"""IoU, unit labels, detectors and concept counts (SEMANTICS §4, §5)."""

from __future__ import annotations

import torch


def iou(intersection: torch.Tensor, unit_area: torch.Tensor, label_area: torch.Tensor,
        label_category: torch.Tensor) -> torch.Tensor:
    """`IoU(u, c) = I(u, c) / (A_k(u) + G(c) - I(u, c))`, `k` the primary category of `c`.

    Args:
        intersection: long `(K, C)`.
        unit_area: long `(K, n_categories)`.
        label_area: long `(C,)`.
        label_category: long `(C,)`, -1 for labels that are never scored.

    Returns:
        float64 `(K, C)`; 0 where the denominator is 0 and for unscored labels.

    Example:
        >>> iou(torch.tensor([[2, 0]]), torch.tensor([[4]]), torch.tensor([3, 5]), torch.tensor([0, 0]))
        tensor([[0.4000, 0.0000]], dtype=torch.float64)
    """
    scored = label_category >= 0
    area = unit_area[:, label_category.clamp(min=0)]
    union = area + label_area.unsqueeze(0) - intersection
    ratio = intersection.double() / union.clamp(min=1).double()
    return torch.where(scored.unsqueeze(0) & (union > 0), ratio, torch.zeros_like(ratio))


def category_best(iou: torch.Tensor, label_category: torch.Tensor,
                  num_categories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`best_k(u)` and `iou_k(u)` for every category (SEMANTICS §5).

    Ties go to the lowest label number (`argmax` returns the first maximum).

    Returns:
        `(labels, scores)`: long and float64 `(K, num_categories)`; a category
        with no label of its own has label -1 and score -inf.
    """
    labels = torch.full((iou.shape[0], num_categories), -1, dtype=torch.long, device=iou.device)
    scores = torch.full((iou.shape[0], num_categories), -torch.inf, dtype=torch.float64, device=iou.device)
    for k in range(num_categories):  # a handful of categories, never units
        columns = (label_category == k).nonzero(as_tuple=True)[0]
        if columns.numel():
            best = iou[:, columns].argmax(dim=1)
            labels[:, k] = columns[best]
            scores[:, k] = iou[:, columns].gather(1, best.unsqueeze(1)).squeeze(1)
    return labels, scores


def unit_labels(category_labels: torch.Tensor, category_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's label: its best category label with the largest IoU (SEMANTICS §5).

    Ties go to the category listed first; categories without labels (score
    -inf) never win unless no category has labels.

    Returns:
        `(labels, scores)`: long and float64 `(K,)`.
    """
    best = category_scores.argmax(dim=1, keepdim=True)
    return category_labels.gather(1, best).squeeze(1), category_scores.gather(1, best).squeeze(1)


def summarize(labels: torch.Tensor, scores: torch.Tensor, category_labels: torch.Tensor,
              category_scores: torch.Tensor, label_category: torch.Tensor, categories: list[str],
              iou_threshold: float) -> dict[str, float]:
    """The counts of SEMANTICS §5, under their reported names.

    Returns:
        `units`, `detectors`, `detectors/<category>`, `unique_concepts`,
        `unique_concepts/<category>`, `unique_top_concepts`, `mean_score`.
    """
    detectors = scores > iou_threshold
    summary: dict[str, float] = {"units": float(labels.shape[0]), "detectors": float(detectors.sum())}
    detector_category = label_category[labels.clamp(min=0)]
    total = 0
    for k, name in enumerate(categories):
        summary[f"detectors/{name}"] = float((detectors & (detector_category == k)).sum())
    for k, name in enumerate(categories):
        found = category_labels[:, k][category_scores[:, k] > iou_threshold].unique().numel()
        summary[f"unique_concepts/{name}"] = float(found)
        total += found
    summary["unique_concepts"] = float(total)
    summary["unique_top_concepts"] = float(labels[detectors].unique().numel())
    summary["mean_score"] = float(scores.clamp(min=0).mean()) if scores.numel() else 0.0
    return summary
