"""Errors as HTTP answers, in one place: every refusal is JSON `{"error": kind, "detail": one line}`.

ldseg's domain exceptions (ldseg.errors) carry the one-line reason ldseg-run prints; the service
only picks the status. Paths inside the request's temporary folder are cut from the reason, so a
client reads `upload.nii.gz: truncated or corrupt gzip data (...)`, not a server path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldseg.errors import ArtifactError, BackendUnavailable, InputError, LdsegError, OutputError


@dataclass
class HttpProblem(Exception):
    """A refusal the service decides itself (auth, size, overload, query, upstream PACS)."""

    status: int
    detail: str
    kind: str = "request"
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.detail


# Most specific first: the first class an exception is an instance of decides.
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (InputError, 400, "input"),  # what ldseg-run refuses with exit 3
    (ValueError, 400, "options"),  # option combinations (outputs.check_output_options)
    (BackendUnavailable, 503, "backend"),
    (ArtifactError, 500, "artifact"),
    (OutputError, 500, "output"),
    (LdsegError, 500, "ldseg"),
)


def one_line(text: str) -> str:
    return " ".join(text.split())


def problem_of(exc: BaseException, scrub: str | None = None) -> HttpProblem:
    """The HTTP answer for `exc`; `scrub` (the request's temporary folder) is cut from the reason."""
    if isinstance(exc, HttpProblem):
        return exc
    detail = one_line(str(exc)) or type(exc).__name__
    if scrub:
        detail = detail.replace(scrub.rstrip("/") + "/", "")
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return HttpProblem(status, detail, kind)
    return HttpProblem(500, f"internal error ({type(exc).__name__}: {detail})", "internal")
