"""komt's error types: one small hierarchy so callers can catch `KomtError` at the edge.

Every message is one line that names the offending file, tensor, flag or value and says what to do.
The command-line entry points catch `KomtError`, print `error: <message>` to stderr and exit 2, so a
user never sees a traceback for bad input.
"""


class KomtError(Exception):
    """Base class of every error komt raises on purpose."""


class ConfigError(KomtError):
    """A config.json (or a preset) is missing, unreadable or describes something komt cannot build."""


class CheckpointError(KomtError):
    """Weights are missing, corrupt, or do not match the model they are loaded into."""


class TokenizerError(KomtError):
    """A tokenizer file is missing or unreadable, or its vocabulary does not fit the model's."""


class GenerationError(KomtError):
    """A generation request is invalid: empty prompt, prompt past the context, bad sampling value."""


class DataError(KomtError):
    """Training or evaluation data is unreadable or malformed (the message names the file and line)."""
