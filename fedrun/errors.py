"""Errors that fedrun reports to the user as one clear line (no traceback)."""


class FedrunError(Exception):
    """Base class: bad input that the user can fix (config, data, checkpoint, CLI)."""


class ConfigError(FedrunError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(FedrunError):
    """A data set is missing, empty, unreadable or cannot be partitioned as asked."""


class CheckpointError(FedrunError):
    """A checkpoint or run directory is missing, corrupt, or does not match the config."""


class DistributedError(FedrunError):
    """A collective failed or timed out: a rank hung, died or lost its connection."""


class TrainingError(FedrunError):
    """A run that cannot learn: e.g. every client update rejected round after round."""


class EvaluationError(FedrunError):
    """Sampling or FID/KID cannot run: no model to sample from, no reference images, no weights."""
