"""Errors the core raises. The CLI is the only place that turns them into a stderr line and exit code.

Every message is one line that says what is wrong and what to do, and carries the offending values.
"""

from __future__ import annotations


class MoeplanError(Exception):
    """Bad input: the CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class UnknownModelError(MoeplanError):
    pass


class ConfigError(MoeplanError):
    """A config.json or card that cannot be turned into a ModelSpec."""


class QuantError(MoeplanError):
    pass


class GpuSpecError(MoeplanError):
    pass


class HubError(MoeplanError):
    pass


class RedundantExpertsError(MoeplanError):
    """--redundant-experts (serving.redundant_experts) the GPUs or the model cannot take."""


class BenchUnavailableError(MoeplanError):
    pass
