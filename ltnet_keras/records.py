"""Writing result records: atomic text files, CSV text, and the versions behind a result."""
import csv
import hashlib
import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Dict, Optional

RECORDED_PACKAGES = ("ltnet-keras", "tensorflow", "tf-keras", "voxelmorph", "neurite", "numpy",
                     "scipy", "nibabel", "matplotlib", "antspyx")


def atomic_write_text(path, text: str) -> Path:
    """Write through a temporary file in the same folder so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as out:
            out.write(text)
        # mkstemp creates 0600 files; give results the usual permissions under the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def csv_text(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def package_versions() -> Dict[str, Optional[str]]:
    """Python and the installed versions of the packages a result depends on."""
    from importlib.metadata import PackageNotFoundError, version
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def read_keyed_record(path, key) -> Optional[dict]:
    """The JSON record a cache wrote at ``path`` if it was made from ``key`` (its ``"key"``
    entry equals it); ``None`` if it is missing, unreadable or made from something else."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("key") == key else None


def shown_path(path, root=None) -> str:
    """``path`` relative to ``root`` (default: the working folder) when it lies inside it, else
    as given: how a record or a note names a file without the machine's absolute prefix."""
    path = Path(path)
    root = Path(root) if root is not None else Path.cwd()
    resolved = path.resolve()
    if resolved.is_relative_to(root.resolve()):
        return str(resolved.relative_to(root.resolve()))
    return str(path)


def without_machine_paths(value, roots):
    """``value`` (JSON-like: dicts, lists, strings) with every string path under one of
    ``roots`` made relative to it: a committed record then names ``images/S13.nii.gz`` (under
    the data root) or ``runs/table1/gan`` (under the repository), not this machine's layout."""
    prefixes = sorted({str(Path(r).resolve()).rstrip("/") + "/" for r in roots if r}, key=len,
                      reverse=True)

    def clean(item):
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        if isinstance(item, str):
            for prefix in prefixes:
                if item.startswith(prefix):
                    return item[len(prefix):]
        return item
    return clean(value)


def file_digest(path) -> str:
    """SHA-256 of a file (which weights a result was made from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
