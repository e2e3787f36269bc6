"""Domain errors. Raised deep inside; the CLI turns each into one line and its exit code."""

from __future__ import annotations


class LdsegError(Exception):
    """Base class: `exit_code` is what the CLI exits with (documented in README)."""

    exit_code = 1


class InputError(LdsegError):
    """An input volume or image is unreadable, malformed or unusable (names the file)."""

    exit_code = 3


class ArtifactError(LdsegError):
    """A checkpoint, bundle or engine set is corrupt, tampered with, or does not match."""

    exit_code = 4


class OutputError(LdsegError):
    """An output cannot be written: it exists without --overwrite, or the disk is full."""

    exit_code = 5


class BackendUnavailable(LdsegError):
    """The requested backend cannot run here (library missing, no GPU, engine for another GPU)."""

    exit_code = 6
