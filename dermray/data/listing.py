"""Which files of a collection are data: the one listing every input folder goes through.

Collections arrive unzipped on laptops, copied off NAS boxes and assembled from several archives, so they carry
files that are never images of lesions: macOS zip debris (``__MACOSX/`` full of AppleDouble ``._*`` files),
notebook checkpoints, NAS thumbnails (``@eaDir``), trash and recycle folders, ``Thumbs.db``. Those are ignored
and counted, never turned into classes or rows. Local folders may also hold symbolic links: a folder link is
followed at most once (by its real path, so a link back to an ancestor cannot loop), and a file reached twice
(through two links, or a link and the original) is listed once, the other paths reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dermray import storage

# Folders that operating systems, archivers, NAS boxes and notebooks create beside data (compared lower-case).
SYSTEM_FOLDERS = frozenset({
    "__macosx", "@eadir", "$recycle.bin", "recycler", "system volume information", "lost+found", "#recycle",
    "#snapshot", "@recycle", "__pycache__",
})
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})


def is_system_name(name: str) -> bool:
    """A file or folder name that is never data: hidden (``.`` first, which covers AppleDouble ``._*``,
    ``.DS_Store``, ``.ipynb_checkpoints``, ``.Trash-1000``) or a known system folder or file."""
    lowered = name.lower()
    return name.startswith(".") or lowered in SYSTEM_FOLDERS or lowered in SYSTEM_FILES


@dataclass
class Listing:
    """The data files under a root, in sorted order, and what was left out."""

    root: str
    files: list[str]
    ignored_files: int = 0  # hidden or system files, and every file inside a hidden or system folder
    ignored_folders: list[str] = field(default_factory=list)  # relative paths of the folders left out
    links_not_followed: list[str] = field(default_factory=list)  # folder links whose real folder was listed already
    same_file: list[tuple[str, str]] = field(default_factory=list)  # (path left out, path listed): one file
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)  # file -> (bytes, mtime ns), when asked for

    def relpath(self, uri: str) -> str:
        return uri[len(self.root):].lstrip("/").lstrip(os.sep)

    def summary(self) -> dict[str, int]:
        """Counts for a command's summary line (no paths: those go to the skip report)."""
        return {"system_files": self.ignored_files, "system_folders": len(self.ignored_folders),
                "folder_links_not_followed": len(self.links_not_followed), "same_file_twice": len(self.same_file)}


def list_data_files(root: str, with_stats: bool = False) -> Listing:
    """Every data file under a local folder or an S3 prefix (see the module docstring for what is left out);
    ``with_stats`` also fills ``stats`` (size and modification time of each file listed)."""
    root = storage.normalize(root)
    if storage.is_s3(root):
        return _list_prefix(root)  # the listing carries sizes and times anyway
    listing = _walk_folder(root)
    if with_stats:
        for path in listing.files:
            info = os.stat(path)
            listing.stats[path] = (info.st_size, info.st_mtime_ns)
    return listing


def _list_prefix(root: str) -> Listing:
    # Object storage has no links: only the names decide.
    listing = Listing(root, [])
    ignored_folders: set[str] = set()
    for uri, size, mtime in storage.list_file_infos(root):
        parts = listing.relpath(uri).split("/")
        system = [i for i, part in enumerate(parts) if is_system_name(part)]
        if not system:
            listing.files.append(uri)
            listing.stats[uri] = (size, mtime)
            continue
        listing.ignored_files += 1
        if system[0] < len(parts) - 1:
            ignored_folders.add("/".join(parts[: system[0] + 1]))
    listing.ignored_folders = sorted(ignored_folders)
    return listing


def _count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))  # links not followed: a count, not a listing


def _walk_folder(root: str) -> Listing:
    listing = Listing(root, [])
    visited_dirs = {os.path.realpath(root)}
    listed_files: dict[str, str] = {}  # real path -> the path it was listed under
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        kept_dirs = []
        for name in dirnames:
            path = os.path.join(directory, name)
            if is_system_name(name):
                listing.ignored_folders.append(listing.relpath(path))
                listing.ignored_files += _count_files(path)
                continue
            real = os.path.realpath(path)
            if real in visited_dirs:
                listing.links_not_followed.append(listing.relpath(path))
                continue
            visited_dirs.add(real)
            kept_dirs.append(name)
        dirnames[:] = kept_dirs  # os.walk descends only into what is left here
        for name in sorted(filenames):
            path = os.path.join(directory, name)
            if is_system_name(name):
                listing.ignored_files += 1
                continue
            real = os.path.realpath(path)
            if real in listed_files:
                listing.same_file.append((path, listed_files[real]))
                continue
            listed_files[real] = path
            listing.files.append(path)
    listing.files.sort()
    return listing


def list_subfolders(root: str) -> list[str]:
    """The immediate sub-folders of a folder or prefix that may hold data (system folders left out)."""
    return [uri for uri in storage.list_dirs(root) if not is_system_name(storage.basename(uri))]
