from fastmirror._core.tracked import TrackedDisk

DISCONNECT: int
MALFORMED: int
IO: int

def serve_connection(sock: int, disk: TrackedDisk, name: bytes,
                     read_only: bool = False) -> int: ...
