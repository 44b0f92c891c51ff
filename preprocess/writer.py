"""Writing one shard: a plain WebDataset tar, byte-identical for the same samples.

Every tar header field that could vary between runs or machines is fixed (mtime 0, uid/gid 0, no user
names, mode 0644, POSIX ustar), and members are written in schema order, so the same samples always give
the same bytes. The tar is written under a hidden temporary name of its own process (`temp_name`) and renamed
when complete: a reader (or a resumed run) never sees a partial shard.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
from pathlib import Path

from shared.schema import Sample, encode_sample


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def temp_name(name: str) -> str:
    """A hidden name private to this process: concurrent runs over one folder (several machines, two
    ranges) never write the same temporary file, and a later run can tell whose a leftover is."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp"


class ShardWriter:
    def __init__(self, path: Path, zstd_level: int):
        self.path = path
        self.tmp = path.with_name(temp_name(path.name))
        self.zstd_level = zstd_level
        self._f = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    def write(self, sample: Sample) -> None:
        for name, data in encode_sample(sample, self.zstd_level).items():
            self._tar.addfile(*_member(f"{sample.key}.{name}", data))
        self.num_samples += 1

    def close(self) -> tuple[int, str]:
        """Finish, fsync and rename into place; returns (bytes, sha256)."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        data_hash = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            while block := f.read(1 << 20):
                data_hash.update(block)
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return size, data_hash.hexdigest()

    def abort(self) -> None:
        try:
            self._tar.close()
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
