"""The one error type of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, from a newer format, or does not fit the model.

    The message names the file (or folder) and what is wrong with it.
    """
