"""Errors a user can act on, each with its own process exit code.

CI scripts branch on the exit code, so every failure class gets a distinct, documented one.
"""


class LlmcError(Exception):
    """Base error: the message names the cause and the fix, in one line where possible."""

    exit_code = 1


class BadInputError(LlmcError):
    """The model directory, recipe or options are wrong (missing, malformed, out of range)."""

    exit_code = 2


class UnsupportedModelError(LlmcError):
    """The model is valid but llmc does not compile its architecture (yet)."""

    exit_code = 3


class BackendBuildError(LlmcError):
    """TensorRT(-RTX) could not parse or build the graph, or lacks a needed capability."""

    exit_code = 4


class AccuracyError(LlmcError):
    """The compiled graph's accuracy is outside the recipe's tolerance or held-out limits (compiler/measure/verdict.py)."""

    exit_code = 5


class OutputWriteError(LlmcError):
    """Writing the artifact failed (disk full, I/O error): nothing is left at the output path."""

    exit_code = 6


class ServerStartError(LlmcError):
    """`llmc serve`: the Triton server could not start (port in use, unusable repository) or stopped on its
    own; the message carries the server's own error line."""

    exit_code = 7


class BuildInterrupted(BaseException):
    """SIGTERM (CI timeout) or SIGINT during a build.

    A BaseException, like KeyboardInterrupt, so that no stage's `except Exception` turns an
    interruption into a wrong diagnosis; the output is unwound exactly as for any failure.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


EXIT_CODES = {
    0: "built, and numerics within the recipe's tolerance",
    1: "internal error (a bug in llmc: please report it with the traceback)",
    BadInputError.exit_code: "bad input: missing/malformed model directory, recipe or option",
    UnsupportedModelError.exit_code: "unsupported model architecture or format",
    BackendBuildError.exit_code: "TensorRT(-RTX) parse or build failure",
    AccuracyError.exit_code: "accuracy outside the recipe's tolerance or held-out limits (perplexity, KL, agreement)",
    OutputWriteError.exit_code: "could not write the artifact (disk full, I/O error); nothing left at the output path",
    ServerStartError.exit_code: "llmc serve: the Triton server could not start (port in use, bad repository) or "
                                "stopped on its own; the message quotes its error",
    130: "interrupted by Ctrl-C (SIGINT); nothing left at the output path",
    143: "terminated by SIGTERM (e.g. a CI timeout); nothing left at the output path",
}
