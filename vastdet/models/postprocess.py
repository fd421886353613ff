"""Detections out of model outputs: top-k over (query, category) scores, boxes in pixels,
labels as real category ids, as COCO result dicts. The columns stand for `category_ids`: [C]
for every image (DINO) or [B, C'] per image (CQ-DINO's selected slots)."""

from __future__ import annotations

import torch

from vastdet.models.box_ops import cxcywh_to_xyxy


class PostProcess:
    def __init__(self, max_detections: int = 300):
        self.max_detections = max_detections  # V3Det's protocol evaluates 300 per image

    @torch.no_grad()
    def __call__(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """orig_sizes [B, 2] as (h, w). Per image: `scores` [k], `labels` (category ids) [k],
        `boxes` [k, 4] xyxy in original pixels, `queries` [k] (the query each came from), best
        first."""
        logits, boxes, cats = outputs["pred_logits"], outputs["pred_boxes"], outputs["category_ids"]
        b, q, c = logits.shape
        k = min(self.max_detections, q * c)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)
        query, column = flat // c, flat % c
        picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
        h, w = orig_sizes.unbind(1)
        scale = torch.stack([w, h, w, h], 1)[:, None].to(picked)
        xyxy = cxcywh_to_xyxy(picked) * scale
        per_image = cats if cats.dim() == 2 else cats[None].expand(b, -1)  # CQ-DINO: [B, C']
        return [
            {
                "scores": scores[i],
                "labels": per_image[i][column[i]],
                "boxes": xyxy[i],
                "queries": query[i],
            }
            for i in range(b)
        ]

    @torch.no_grad()
    def coco_boxes(self, outputs: dict, orig_sizes: torch.Tensor) -> list[tuple]:
        """Per image (scores [k], category ids [k], boxes [k, 4] as COCO's x, y, w, h in
        original pixels), on the CPU: the detections evaluation and results files hold."""
        out = []
        for det in self(outputs, orig_sizes):
            xywh = torch.cat([det["boxes"][:, :2], det["boxes"][:, 2:] - det["boxes"][:, :2]], 1)
            out.append((det["scores"].cpu(), det["labels"].cpu(), xywh.cpu()))
        return out

    def coco_results(
        self, outputs: dict, orig_sizes: torch.Tensor, image_ids: list[int]
    ) -> list[dict]:
        """COCO-format result dicts: image_id, category_id, bbox [x, y, w, h], score."""
        results = []
        for image_id, (scores, labels, xywh) in zip(
            image_ids, self.coco_boxes(outputs, orig_sizes)
        ):
            for score, label, box in zip(scores.tolist(), labels.tolist(), xywh.tolist()):
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(label),
                        "bbox": box,
                        "score": score,
                    }
                )
        return results
