"""The one exception type for user mistakes: the CLI prints its message without a traceback."""


class PipelineError(ValueError):
    """A problem the user can fix (bad input, bad option, stale artifact). The message says how."""
