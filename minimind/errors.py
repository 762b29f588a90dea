"""Errors the training code raises across modules; `train.run` maps them to exit codes."""


class UsageError(Exception):
    """A problem with what the user asked for; reported as `train.py: error: ...`, exit 2."""


class TrainingDiverged(Exception):
    """A non-finite loss, gradient norm or weight: the run stops without saving it, exit 1."""
