"""The training room: the per-worker train function (``loop``), evaluation scoring, checkpoint
state, run outputs and reports, and the TorchTrainer wiring (``trainer``)."""
