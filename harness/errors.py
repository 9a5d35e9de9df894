"""The two ways a run ends early, shared by every module (so none imports another for them).

UsageError  bad input (flags, model, data, output folder, checkpoint): one line, exit 2
TrainingError  the run cannot go on (e.g. repeated non-finite steps): one line, exit 1
"""


class UsageError(Exception):
    """Bad input; the message says what to change. Printed as one line, exit code 2."""


class TrainingError(Exception):
    """The run cannot go on; the message says why and where the last checkpoint is. Exit code 1."""
