"""The one exception type for errors a user can cause (bad file, bad filter, bad argument).

The command line prints `str(err)` as one line and exits non-zero; no traceback reaches a user.
"""


class WiretrailError(Exception):
    """A user-facing error with a one-line message."""


class CaptureError(WiretrailError):
    """A capture file that cannot be read (further).

    `offset` is the byte offset of the fault in the (decompressed) stream, or None;
    `packets` is how many packets were read from the file before the fault. A reader
    raises this *after* yielding every batch it could read, so what came before is kept.
    """

    def __init__(self, path: str, message: str, offset: int | None = None, packets: int = 0):
        self.path = path
        self.offset = offset
        self.packets = packets
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{path}: {message}{where}")
