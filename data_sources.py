"""Where the records come from: a local JSON or JSONL file, an http(s) URL or Google Drive link downloaded once into
a cache, or a Hugging Face dataset id. `load_records` returns the raw records; alpaca_data.py checks and tokenizes
them. Every problem is a `DataError` whose one-line message names the file or URL and what is wrong.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import datasets

from atomic import atomic_write


class DataError(ValueError):
    """One-line, user-facing data problem (train.py prints str(e) and exits 1 before the model loads)."""

    def __init__(self, message: str):
        # Messages may quote text from files or libraries; keep them on one line whatever it contains.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_RECORDS, ALPACA_BYTES = 52002, 22773992  # checked when the default full data set is downloaded
DEBUG_SAMPLE = Path(__file__).parent / "data" / "alpaca_sample.json"
DOWNLOAD_TIMEOUT_S = 60
# "owner/name" as on the Hugging Face hub, e.g. "tatsu-lab/alpaca".
_HF_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GDRIVE_HOSTS = ("drive.google.com", "docs.google.com")


def _parse_json(text: str, where: str, whole_file: bool):
    """json.loads, with each way it can fail as one DataError that starts with `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if whole_file else f"column {e.colno}"
        raise DataError(f"{where}: invalid JSON at {at}: {e.msg}") from None
    except ValueError as e:  # an integer of more than 4,300 digits, which Python refuses to convert
        raise DataError(f"{where}: unreadable JSON value ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None


def _type_name(value: Any) -> str:
    """Name a value's type for an error message (`null` rather than `NoneType`, as in the JSON file)."""
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

def load_records(source: str, cache_dir: str | Path) -> list[dict]:
    """Resolve a data source to its list of raw records.

    Args:
        source: one of
            - a local `.json` file holding a list of objects, or a `.jsonl` file with one object per line;
            - an http(s) URL, downloaded once into `cache_dir/downloads/`: written to a temp file, parsed,
              then renamed into place, so a cut-off or malformed download never enters the cache.
              `ALPACA_URL` is also checked against the known size and record count of the Stanford
              Alpaca file;
            - a Google Drive link (drive.google.com/...), downloaded once with gdown the same way;
            - a Hugging Face dataset id such as "tatsu-lab/alpaca", loaded with
              `datasets.load_dataset(source)["train"]` (needs the hub or its local cache).
            "owner/name" is read as a local file when the file or its folder exists.
        cache_dir: folder for downloads (and the Hugging Face cache); created if missing.

    Returns:
        The records as parsed, not yet validated (see `validate_records`).

    Raises:
        DataError: the file is missing, unreadable, not UTF-8 or not valid JSON/JSONL; the top level is not a
            list; a download fails or does not match the expected size; the dataset cannot be loaded.
    """
    source = str(source).strip()
    if not source:
        raise DataError("data source is empty: give a .json/.jsonl path, an http(s) URL, a Google Drive "
                        "link or a Hugging Face dataset id")
    cache_dir = Path(cache_dir)
    url = urllib.parse.urlparse(source)
    if url.scheme.lower() in ("http", "https"):
        if (url.hostname or "").lower() in _GDRIVE_HOSTS:
            return _cached_download(source, _cache_path(cache_dir, source, "gdrive-"), _fetch_gdrive)
        return _cached_download(source, _cache_path(cache_dir, source), _fetch_http)
    path = Path(source).expanduser()
    # "owner/name" is a hub id unless it names something local: an existing file, a .json/.jsonl name, or a
    # file in an existing folder ("data/alpaca" with a missing extension should say "file not found").
    looks_local = path.exists() or path.suffix.lower() in (".json", ".jsonl") or path.parent.is_dir()
    if looks_local or not _HF_DATASET_ID.match(source):
        return _read_records_file(path, source)
    return _load_hf_dataset(source, cache_dir)


def _read_records_file(path: Path, label: str, suffix: str | None = None) -> list:
    """Parse a .json list or a .jsonl file; `label` names the file in error messages and `suffix` overrides
    the extension that decides the format (for temp files)."""
    if path.is_dir():
        raise DataError(f"{label}: is a directory, expected a .json or .jsonl file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except OSError as e:
        raise DataError(f"{label}: cannot read the file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark, which some editors write
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{label}: not valid UTF-8 at line {line} (byte offset {e.start}: "
                        f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{label}: the file is empty")

    suffix = (suffix if suffix is not None else path.suffix).lower()
    # Downloads may have no useful extension: a JSON list starts with "[", JSONL with "{".
    is_jsonl = suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("["))
    if is_jsonl:
        records = []
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028/U+0085, which splitlines breaks on.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            records.append(_parse_json(line, f"{label}: line {lineno}", whole_file=False))
        return records

    data = _parse_json(text, label, whole_file=True)
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a JSON list of records at the top level, got {_type_name(data)}")
    return data


def _cache_path(cache_dir: Path, url: str, prefix: str = "") -> Path:
    """Where a download of `url` is kept: readable name plus a hash of the full URL (query included)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]", "_", Path(urllib.parse.urlparse(url).path).name)[:80] or "data"
    return cache_dir / "downloads" / f"{prefix}{digest}-{name}"


def _check_alpaca(url: str, path: Path, records: list, label: str) -> None:
    """The default data set must have its known size and record count: anything else is a cut-off or
    changed file."""
    if url != ALPACA_URL:
        return
    size = path.stat().st_size
    if size != ALPACA_BYTES:
        raise DataError(f"{label}: {size:,} bytes, expected {ALPACA_BYTES:,} "
                        f"(download cut short, or the file changed upstream)")
    if len(records) != ALPACA_RECORDS:
        raise DataError(f"{label}: {len(records):,} records, expected {ALPACA_RECORDS:,}")


def _cached_download(url: str, dest: Path, fetch) -> list:
    """Records of `url`, downloaded once to `dest`; later calls read `dest` without touching the network.

    `fetch(url, tmp)` writes the body to a temporary file beside `dest`, which is parsed and checked before it
    is renamed to `dest` (atomic.atomic_write), so a failed, cut-off or malformed download never enters the
    cache. Concurrent processes (DDP ranks) each write their own; the last rename wins, with the same content.
    """
    if dest.exists():
        label = f"{url} (cached as {dest})"
        records = _read_records_file(dest, label)
        try:
            _check_alpaca(url, dest, records, label)
        except DataError as e:
            raise DataError(f"{e}; delete the cached file to download it again") from None
        return records
    with atomic_write(dest) as tmp:
        fetch(url, tmp)
        records = _read_records_file(tmp, url, suffix=dest.suffix)
        _check_alpaca(url, tmp, records, url)
    return records


def _fetch_http(url: str, tmp: Path) -> None:
    """Download `url` to `tmp` with urllib; any failure is a DataError."""
    request = urllib.request.Request(url, headers={"User-Agent": "alpaca-lora-course"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "xb") as f:
            expected = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: download failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DataError(f"{url}: download failed: {e.reason}") from None
    except (http.client.HTTPException, OSError) as e:  # reset connection, timeout, full disk
        raise DataError(f"{url}: download failed: {type(e).__name__}: {e}") from None
    # A connection closed early can end the body without an exception: compare with the announced size.
    if expected is not None and expected.isdigit() and received != int(expected):
        raise DataError(f"{url}: download failed: received {received:,} of {int(expected):,} bytes")


def _fetch_gdrive(url: str, tmp: Path) -> None:
    """Download a Google Drive file to `tmp` with gdown (it handles Drive's confirmation pages)."""
    import gdown  # imported here: it pulls in requests, and most runs never need it

    try:
        gdown.download(url, output=str(tmp), quiet=True, timeout=DOWNLOAD_TIMEOUT_S)
    except Exception as e:  # gdown raises its own errors, requests' and OSError; all mean "failed"
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{url}: Google Drive download failed: {type(e).__name__}: {first_line}") from None
    if not tmp.is_file():
        raise DataError(f"{url}: Google Drive download produced no file (is the link shared publicly?)")


def _load_hf_dataset(name: str, cache_dir: Path) -> list[dict]:
    """Load the train split of a Hugging Face dataset as a list of records."""
    try:
        dataset = datasets.load_dataset(name, cache_dir=str(cache_dir / "hf"))
    except Exception as e:  # hub, network, missing-dataset and format errors alike are user-facing here
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{name}: cannot load Hugging Face dataset: {type(e).__name__}: {first_line}") from None
    if "train" not in dataset:
        raise DataError(f"{name}: Hugging Face dataset has no 'train' split (it has {sorted(dataset)})")
    return dataset["train"].to_list()
