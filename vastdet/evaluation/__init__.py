"""Evaluation: COCO box AP computed as pycocotools does, fast at vast vocabularies."""


class IncompleteEvaluationError(RuntimeError):
    """Fewer images were evaluated than the val shards hold (and partial evaluation was not
    allowed); the metrics were written all the same, with both counts."""
