"""Where `igcam batch` reads images and writes results: a local folder, or a filesystem URI that pyarrow (and so Ray
Data) opens: file://, s3://, gs://, abfs://, hdfs:// (the cloud ones need their optional packages and credentials
in the environment, as pyarrow reads them). The same listing, reading and writing serve every kind, so the resume
check works from the output location itself, wherever it is."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from igcam_engine.errors import InputError, OptionError, Unavailable

SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


@dataclass
class Location:
    """A folder on a pyarrow filesystem: `fs` and its path there; `text` as the user wrote it (credentials
    included: never printed, see `shown`)."""

    text: str
    fs: object
    path: str
    local: bool  # a path of this machine's disk, written without a scheme

    @classmethod
    def parse(cls, text) -> "Location":
        import pyarrow.fs

        text = str(text)
        scheme = text.split("://", 1)[0].lower() if "://" in text else None
        if scheme is None:
            return cls(text, pyarrow.fs.LocalFileSystem(), os.path.abspath(text), True)
        if scheme not in SCHEMES:
            raise OptionError(f"'{cls(text, None, '', False).shown}': unsupported storage scheme '{scheme}://'; "
                            f"accepted: a local path or {', '.join(s + '://' for s in SCHEMES)}")
        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(text)
        except (ValueError, OSError, ImportError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise OptionError(f"cannot open '{cls(text, None, '', False).shown}': {_first_line(e)}") from None
        return cls(text, fs, path.rstrip("/"), False)

    def join(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def shown(self) -> str:
        """The location as messages and records name it: without credentials (s3://KEY:SECRET@bucket) or query
        options (?endpoint_override=...) that a URI may carry."""
        if self.local:
            return self.text.rstrip("/")
        scheme, rest = self.text.split("://", 1)
        rest = rest.split("?", 1)[0]
        head, _, tail = rest.partition("/")
        return f"{scheme}://{head.rsplit('@', 1)[-1]}{'/' + tail if tail else ''}".rstrip("/")

    def same_as(self, other: "Location") -> bool:
        return type(self.fs) is type(other.fs) and PurePosixPath(self.path) == PurePosixPath(other.path)

    def kind(self) -> str:
        import pyarrow.fs

        try:
            return {pyarrow.fs.FileType.Directory: "folder", pyarrow.fs.FileType.File: "file",
                    pyarrow.fs.FileType.NotFound: "missing"}.get(self.fs.get_file_info(self.path).type, "other")
        except OSError as e:
            raise Unavailable(f"cannot reach '{self.shown}': {_first_line(e)}") from None

    def files(self) -> dict:
        """{file name: size} of the entries directly in the folder that are not folders (none when it does not
        exist); size None for an entry that is no readable file (a broken link, a link loop), which pyarrow's own
        listing would leave out without a word."""
        import pyarrow.fs

        if self.kind() == "missing":
            return {}
        try:
            if self.local:
                return {entry.name: _size(entry) for entry in os.scandir(self.path) if not _is_folder(entry)}
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, recursive=False))
        except OSError as e:
            raise InputError(f"cannot list '{self.shown}': {_first_line(e)}") from None
        return {PurePosixPath(i.path).name: i.size if i.type == pyarrow.fs.FileType.File else None
                for i in infos if i.type != pyarrow.fs.FileType.Directory}

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.join(name)) as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        """Writes a whole file. Local files appear whole (written beside, then renamed); object stores make an
        object visible only once its upload completes."""
        if self.local:
            target = self.join(name)
            partial = f"{os.path.dirname(target)}/.{os.path.basename(target)}.partial"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, target)
            return
        with self.fs.open_output_stream(self.join(name)) as f:
            f.write(data)

    def create(self) -> None:
        kind = self.kind()
        if kind not in ("folder", "missing"):
            raise OptionError(f"output '{self.shown}' exists and is not a folder")
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise OptionError(f"cannot create the output folder '{self.shown}': {_first_line(e)}") from None
        if self.local and not os.access(self.path, os.W_OK | os.X_OK):
            raise OptionError(f"the output folder '{self.shown}' is not writable")

    @property
    def filesystem(self):
        """The pyarrow filesystem Ray Data's readers take for a URI's files (None for a local folder)."""
        return None if self.local else self.fs


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop
        return False


def _size(entry: os.DirEntry):
    """A regular file's size (links followed), or None."""
    try:
        info = entry.stat()
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None
