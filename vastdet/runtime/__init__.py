"""What training, evaluation, export and prediction share: reading weights in the layouts users
have (`weights`), loading a trained model from a run folder or an exported file (`loading`,
with `checkpoints` and the ZeRO `partitions`), the process group (`distributed`), a run's
metrics log (`metrics`, `tensorboard`) and its figures (`plot`). The trainer (`vastdet.engine`)
and the evaluator (`vastdet.evaluation`) both import from here, not from each other."""
