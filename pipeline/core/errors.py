"""The one exception type for user mistakes: the CLI prints its message without a traceback."""

from pipeline.core.redaction import redact_text


class PipelineError(ValueError):
    """A problem the user can fix (bad input, bad option, stale artifact). The message says how; a Hub token
    from the environment never appears in it (`pipeline.core.redaction`)."""

    def __init__(self, *args):
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))
