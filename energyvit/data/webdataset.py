"""WebDataset tar shards, read in place: an index of every sample's image member (shard, byte
offset, size) and label, built once by reading the shards' tar headers, then one `os.pread` per
image. Random access by index keeps the training sampler's `(index, seed)` keys, and with them
exact resume, as for a folder of files.

Layout (WebDataset's): the members of one sample are consecutive and share a key, the member's
path up to the first dot of its file name (`train/n01440764_10026.JPEG` -> key
`train/n01440764_10026`, extension `jpeg`). A sample's image is its first member with extension
jpg, jpeg, png or webp; `KEY.cls` holds its class index as text; other members are ignored.

Shards are untrusted: nothing is extracted or written, member paths are only split into key and
extension, links and other non-file members are ignored, and an image member above
MAX_MEMBER_BYTES or a label that is not a small integer drops its sample. A shard that is not a
readable uncompressed tar is skipped; a damaged one keeps the samples before the damage. What was
skipped is counted and described (`ShardIndex.problems`), never silent.
"""
from __future__ import annotations

import functools
import os
import re
import tarfile
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SHARD_SUFFIX", "IMAGE_EXTENSIONS", "MAX_MEMBER_BYTES", "MAX_LABEL", "ShardIndex", "expand_braces",
           "list_shards", "scan_shards", "read_member"]

SHARD_SUFFIX = ".tar"
IMAGE_EXTENSIONS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}  # -> Pillow format
PIL_FORMATS = tuple(sorted(set(IMAGE_EXTENSIONS.values())))  # the only decoders a shard's bytes may reach
LABEL_EXTENSION = "cls"
MAX_MEMBER_BYTES = 128 << 20  # an image member larger than this is not an image worth reading
MAX_LABEL_BYTES = 32
MAX_LABEL = 999_999  # classes are 0..max label: a larger "label" is damage, not a class
_BLOCK = tarfile.BLOCKSIZE
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_PATTERN_SHARDS = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """Shard paths of a brace pattern, in order: `{000..099}` a numeric range (zero-padded as its
    first bound is), `{a,b}` alternatives; several braces multiply. ValueError for an empty or
    enormous expansion."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo or hi - lo >= MAX_PATTERN_SHARDS:
            raise ValueError(f"shard pattern {pattern}: range {{{body}}} must run upwards over at most "
                             f"{MAX_PATTERN_SHARDS} values")
        width = len(r.group(1).lstrip("-")) if r.group(1).lstrip("-").startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    out = [p for choice in choices for p in expand_braces(head + choice + tail)]
    if len(out) > MAX_PATTERN_SHARDS:
        raise ValueError(f"shard pattern {pattern} names more than {MAX_PATTERN_SHARDS} shards")
    return out


def is_pattern(path: str) -> bool:
    return _BRACE.search(path) is not None and not os.path.exists(path)


def list_shards(path: str) -> list[str]:
    """The shards of a brace pattern (each must exist) or the `.tar` files directly inside the
    folder `path`, sorted by name (hidden files apart); [] when the folder has none."""
    if is_pattern(path):
        shards = expand_braces(path)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"shard pattern {path}: {len(missing)} of its {len(shards)} shards not found, "
                                    f"first {missing[0]}")
        return shards
    with os.scandir(path) as entries:
        return sorted(e.path for e in entries
                      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(SHARD_SUFFIX))


@dataclass
class ShardIndex:
    """Every sample of a list of shards, in shard then member order."""
    shards: list[str]
    shard: np.ndarray  # (n,) int32: which shard holds the sample's image
    offset: np.ndarray  # (n,) int64: byte offset of the image's data in it
    size: np.ndarray  # (n,) int64: its size in bytes
    label: np.ndarray  # (n,) int64: class index, -1 for an unlabeled dataset
    labeled: bool
    skipped_samples: int = 0  # samples dropped while indexing (damage, bad label, too large)
    bad_shards: int = 0  # shards not readable at all
    problems: list[str] = field(default_factory=list)  # one line per shard with something skipped

    def __len__(self) -> int:
        return len(self.offset)

    def summary(self) -> str:
        """'' when nothing was skipped, else one line: counts and the first problems."""
        if not self.problems:
            return ""
        shown = "; ".join(self.problems[:3]) + (f"; ... ({len(self.problems) - 3} more)" if len(self.problems) > 3
                                                 else "")
        return (f"{self.bad_shards} of {len(self.shards)} shards unreadable, {self.skipped_samples} samples "
                f"skipped while indexing: {shown}")


def _key_and_extension(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member path: key = folder + file name up to its first dot,
    extension = the rest, lowercased; None for hidden files and names without an extension."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return f"{folder}/{stem}" if folder else stem, ext.lower()


def _parse_label(raw: bytes) -> int | None:
    try:
        value = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if 0 <= value <= MAX_LABEL else None


def _scan_shard(path: str) -> tuple[list[tuple[int, int, int, bool]], int, str, bool]:
    """(samples (offset, size, label, has_label), samples dropped, problem or '', whether it is a
    tar at all) of one shard."""
    samples: list[tuple[int, int, int, bool]] = []
    dropped, notes = 0, []
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            return [], 0, f"{path}: not a readable uncompressed tar file ({type(exc).__name__}: {exc})", False
        key, image, label = None, None, None  # the sample being read: its key, image member, .cls member
        bad_sample = ""

        def finish() -> None:
            nonlocal dropped
            if key is None or image is None:
                return
            reason = bad_sample
            value = -1
            if not reason and label is not None:
                value = _parse_label(os.pread(f.fileno(), label[1], label[0])) if label[1] <= MAX_LABEL_BYTES else None
                if value is None:
                    reason = f"{key}.cls is not a class index in 0..{MAX_LABEL}"
            if reason:
                dropped += 1
                if len(notes) < 2:
                    notes.append(reason)
                return
            samples.append((image[0], image[1], value, label is not None))

        damage = ""
        try:
            while (info := tar.next()) is not None:
                # links, folders and sparse files (data not in one run of bytes) are not samples
                split = _key_and_extension(info.name) if info.isreg() and not info.issparse() else None
                if split is None:
                    continue
                if split[0] != key:
                    finish()
                    key, image, label, bad_sample = split[0], None, None, ""
                ext = split[1]
                if info.offset_data + info.size > file_size:  # truncated: this sample is lost below
                    image = image or ((info.offset_data, info.size) if ext in IMAGE_EXTENSIONS else None)
                    raise tarfile.ReadError(f"{info.name} runs past the end of the file")
                if ext in IMAGE_EXTENSIONS and image is None:
                    image = (info.offset_data, info.size)
                    if info.size > MAX_MEMBER_BYTES:
                        bad_sample = f"{info.name} is {info.size} bytes (over {MAX_MEMBER_BYTES})"
                elif ext == LABEL_EXTENSION:
                    label = (info.offset_data, info.size)
                tar.members.clear()  # tarfile keeps every header read; the index needs none of them
        except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError) as exc:
            damage = f"damaged at byte {tar.offset} ({type(exc).__name__}: {exc})"
        else:
            # next() also ends without a word at a header it cannot parse: only zeros (or the
            # file's end) close a tar
            tail = os.pread(f.fileno(), _BLOCK, tar.offset)
            if tail.strip(b"\0"):
                damage = f"damaged at byte {tar.offset} (not a tar header)"
        if damage:
            if key is not None and image is not None:  # the sample being read may have lost members
                dropped += 1
        else:
            finish()
    problem = "; ".join(filter(None, [damage, *notes]))
    return samples, dropped, f"{path}: {problem}" if problem else "", True


def scan_shards(shards: list[str]) -> ShardIndex:
    """The index of `shards` (read once per process for the same files: see _scan_cached)."""
    stats = tuple((s, st.st_size, st.st_mtime_ns) for s in shards for st in [os.stat(s)])
    return _scan_cached(stats)


@functools.lru_cache(maxsize=4)  # the train split is scanned again when the val split checks its labels
def _scan_cached(stats: tuple[tuple[str, int, int], ...]) -> ShardIndex:
    shards = [s for s, _, _ in stats]
    tables, problems = [], []  # per shard: (n, 5) int64 rows of shard, offset, size, label, has label
    skipped = bad = 0
    for i, path in enumerate(shards):
        samples, dropped, problem, is_tar = _scan_shard(path)
        if problem:
            problems.append(problem)
        bad += not is_tar
        skipped += dropped
        tables.append(np.array([(i, *sample) for sample in samples], dtype=np.int64).reshape(-1, 5))
    table = np.concatenate(tables) if tables else np.zeros((0, 5), dtype=np.int64)
    labeled = bool(table[:, 4].any())
    if labeled and not table[:, 4].all():  # in a labeled set every image needs its class
        missing = int((table[:, 4] == 0).sum())
        problems.append(f"{missing} samples without a .cls label in a labeled dataset")
        skipped += missing
        table = table[table[:, 4] == 1]
    return ShardIndex(shards, table[:, 0].astype(np.int32), table[:, 1].copy(), table[:, 2].copy(),
                      table[:, 3].copy(), labeled, skipped, bad, problems)


def read_member(index: ShardIndex, i: int) -> bytes:
    """The bytes of sample i's image. OSError when the shard no longer holds them (changed since
    it was indexed): the caller skips the sample as it skips an unreadable image file."""
    path, offset, size = index.shards[index.shard[i]], int(index.offset[i]), int(index.size[i])
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: {size} bytes expected at byte {offset}, {len(data)} found (shard changed since it "
                      "was indexed?)")
    return data
