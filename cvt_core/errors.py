"""The error every cvt_core reader raises, in a module of its own so that each reader can import it."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or unsafe; the message names the file and the problem."""
