"""Evaluation: COCO box AP computed as pycocotools does, fast at vast vocabularies."""
