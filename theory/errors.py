"""Exceptions for bad user input, shared by every layer (the CLI prints them as one line)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a user: a file, an array, a spec or a parameter.

    The message names the problem and where it is (field, row, file) and, where it helps, the
    allowed values. The command line prints it as one line, without a traceback.
    """


class SeparableDataError(InputError):
    """The labelled pairs are (nearly) linearly separable, so the unconstrained MLE does not exist."""
