"""One TensorRT logger per process, never freed.

TensorRT keeps the logger it was first given for the life of the process: "the logger is internally
considered a singleton, and thus multiple instances of IRuntime and/or IBuilder must all use the same
logger" (TensorRT 8.0 API, nvinfer1::ILogger), and its process-lifetime plugin registry keeps a pointer
to it (TensorRT Edge-LLM's TrtLogger is immortal for that reason). A logger made per build and freed
after it leaves TensorRT calling into a dead Python object at the next Builder: measured here as a
test worker hung for good in `CapturingLogger.log` inside the second `trt.Builder(...)` of a process
(every thread on a futex). So every Builder, OnnxParser and Runtime in llmc gets `process_logger(trt)`.
"""

from __future__ import annotations

import threading

_LOGGERS: dict[int, object] = {}  # id(trt module) -> its logger, kept for the life of the process
_LOCK = threading.Lock()


def process_logger(trt):
    """The process's logger for this TensorRT module: errors collected in `.messages` (clear per build)."""
    with _LOCK:
        logger = _LOGGERS.get(id(trt))
        if logger is None:
            class CapturingLogger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.messages: list[str] = []
                    self.error = trt.ILogger.Severity.ERROR

                def log(self, severity, msg):
                    if severity <= self.error:
                        self.messages.append(str(msg))

            logger = _LOGGERS[id(trt)] = CapturingLogger()
            _LOGGERS[-id(trt)] = trt  # the module too: its id must not be reused by another object
        return logger
