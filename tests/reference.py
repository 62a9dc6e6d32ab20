"""A slow, obviously-correct Network Dissection, written from SEMANTICS.md alone.

Float64 loops over images, units and labels; label sets read straight from the
Broden files. The engine is tested against it; it shares no code with the
engine beyond the Broden reader (tested on its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_dissect.broden import Broden


def reference_dissection(acts: torch.Tensor, broden: Broden, rows: list[int], categories: list[str],
                         quantile: float, iou_threshold: float, denominator: str) -> dict:
    n, num_units, h, w = acts.shape
    primary = broden.primary_categories(categories)
    num_labels = len(broden.label_names)
    thresholds = torch.tensor(
        [torch.quantile(acts[:, u].flatten().double(), 1 - quantile).item() for u in range(num_units)],
        dtype=torch.float64)
    intersection = torch.zeros(num_units, num_labels, dtype=torch.float64)
    unit_area = torch.zeros(num_units, len(categories), dtype=torch.float64)
    label_area = torch.zeros(num_labels, dtype=torch.float64)
    for x, row in enumerate(rows):
        maps, image_level = broden.read_segmentation(row, categories)
        sh, sw = broden.row(row).segmentation_size
        upsampled = F.interpolate(acts[x : x + 1].float().contiguous(), size=(sh, sw), mode="bilinear",
                                  align_corners=False)[0]
        masks = upsampled.double() > thresholds.view(-1, 1, 1)
        pixel_labels = {int(v) for m in maps for v in m.unique().tolist() if v != 0}
        present_labels = {c for c in pixel_labels | set(image_level) if primary[c] is not None}
        regions = {}
        for c in present_labels:
            if c in image_level:
                regions[c] = torch.ones(sh, sw, dtype=torch.bool)
            else:
                region = torch.zeros(sh, sw, dtype=torch.bool)
                for m in maps:
                    region |= m == c
                regions[c] = region
            label_area[c] += regions[c].sum().item()
        present = {primary[c] for c in present_labels}
        for u in range(num_units):
            area = masks[u].sum().item()
            for c, region in regions.items():
                intersection[u, c] += (masks[u] & region).sum().item()
            for k, category in enumerate(categories):
                if denominator == "global":
                    unit_area[u, k] += area
                elif denominator == "paper":
                    if category in present:
                        unit_area[u, k] += area
                else:  # lite
                    touched = any(
                        primary[c] == category and any((masks[u] & (m == c)).any().item() for m in maps)
                        for c in pixel_labels if primary[c] is not None)
                    image_tagged = any(primary[c] == category for c in image_level if primary[c] is not None)
                    if touched or image_tagged:
                        unit_area[u, k] += area
    iou = torch.zeros(num_units, num_labels, dtype=torch.float64)
    for u in range(num_units):
        for c in range(1, num_labels):
            if primary[c] is None:
                continue
            k = categories.index(primary[c])
            union = unit_area[u, k] + label_area[c] - intersection[u, c]
            iou[u, c] = intersection[u, c] / union if union > 0 else 0.0
    # Labels (SEMANTICS §5).
    category_labels, category_scores = [], []
    for u in range(num_units):
        best_labels, best_scores = [], []
        for category in categories:
            best, score = -1, -float("inf")
            for c in range(1, num_labels):
                if primary[c] == category and iou[u, c].item() > score:
                    best, score = c, iou[u, c].item()
            best_labels.append(best)
            best_scores.append(score)
        category_labels.append(best_labels)
        category_scores.append(best_scores)
    labels, scores = [], []
    for u in range(num_units):
        best_k = 0
        for k in range(len(categories)):
            if category_scores[u][k] > category_scores[u][best_k]:
                best_k = k
        labels.append(category_labels[u][best_k])
        scores.append(category_scores[u][best_k])
    detectors = [s > iou_threshold for s in scores]
    unique = {}
    for k, category in enumerate(categories):
        unique[category] = len({category_labels[u][k] for u in range(num_units)
                                if category_scores[u][k] > iou_threshold})
    detector_counts = {category: sum(1 for u in range(num_units)
                                     if detectors[u] and primary[labels[u]] == category) for category in categories}
    return {
        "thresholds": thresholds, "intersection": intersection, "unit_area": unit_area,
        "label_area": label_area, "iou": iou, "category_labels": torch.tensor(category_labels),
        "category_scores": torch.tensor(category_scores, dtype=torch.float64),
        "labels": torch.tensor(labels), "scores": torch.tensor(scores, dtype=torch.float64),
        "unique_concepts": sum(unique.values()), "unique_per_category": unique,
        "unique_top_concepts": len({labels[u] for u in range(num_units) if detectors[u]}),
        "detectors": sum(detectors), "detectors_per_category": detector_counts,
    }
