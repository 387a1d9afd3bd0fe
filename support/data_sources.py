"""Where the records come from: a local .json, .jsonl, .csv or .parquet file, an http(s) URL or
Google Drive link downloaded once into a cache, or a Hugging Face dataset id. `load_records` returns
the raw records, renamed to the Alpaca fields by an optional field map (DATA_FIELDS); alpaca_data.py
checks and tokenizes them. Every problem is a `DataError` whose one-line message names the file or
URL, the line, record or row, and what is wrong.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

from support.atomic import atomic_write


class DataError(ValueError):
    """One-line, user-facing data problem (train.py prints str(e) and exits 1 before the model
    loads)."""

    def __init__(self, message: str):
        # Messages may quote text from files or libraries; keep them on one line whatever it
        # contains.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class Records(list):
    """The records of a source, as a list, plus what a message needs to point at one of them:
    `where(i)` names record i as an editor shows it, from 1 ("line 7" of a JSONL or CSV file,
    "record 3" of a JSON list, "row 2" of a Parquet file or Hugging Face dataset); `column(field)`
    is the data's own name for a field DATA_FIELDS renamed.
    """

    def __init__(self, records=(), unit: str = "record", numbers: list[int] | None = None,
                 fields: Mapping[str, str] | None = None):
        super().__init__(records)
        self.unit, self.numbers, self.fields = unit, numbers, dict(fields or {})
        # columns DATA_FIELDS replaced (an `output` column when output=answer)
        self.dropped: list[str] = []

    def where(self, i: int) -> str:
        return f"{self.unit} {self.numbers[i] if self.numbers is not None else i + 1}"

    def column(self, field: str) -> str:
        return self.fields.get(field, field)


ALPACA_FIELDS = ("instruction", "input", "output")
ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
# checked when the default full data set is downloaded
ALPACA_RECORDS, ALPACA_BYTES = 52002, 22773992
DEBUG_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "alpaca_sample.json"
DOWNLOAD_TIMEOUT_S = 60
FORMATS = (".json", ".jsonl", ".csv", ".parquet")
# "owner/name" as on the Hugging Face hub, e.g. "tatsu-lab/alpaca".
_HF_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GDRIVE_HOSTS = ("drive.google.com", "docs.google.com")


@contextlib.contextmanager
def quiet_datasets(log_errors: bool = True) -> Iterator[None]:
    """Hide datasets' progress bars ("Generating train split", "Tokenizing", "Saving the dataset")
    inside the block and restore the caller's setting after: a run prints its own one-line summary
    of the data. With `log_errors=False` its logged errors go too, for calls whose failure we
    re-raise as a DataError anyway."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    if not log_errors:
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


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
    """Name a value's type for an error message (`null` rather than `NoneType`, as in the JSON
    file)."""
    return "null" if value is None else type(value).__name__


def _names(keys, limit: int = 12) -> str:
    """"a, b, c" for a message; a long list is cut after `limit` names."""
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(str(k) for k in keys[:limit]) + more


def _first_line(e: BaseException) -> str:
    """An exception from a library as "Type: first line of its message"."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def load_records(source: str, cache_dir: str | Path,
                 fields: Mapping[str, str] | None = None) -> Records:
    """Resolve a data source to its list of raw records.

    Args:
        source: one of
            - a local file: a `.json` list of objects, a `.jsonl` file with one object per line, or
              a `.csv` (header line; every cell read as text) or `.parquet` table, read by datasets'
              own loaders;
            - an http(s) URL, downloaded once into `cache_dir/downloads/` (see `_cached_download`),
              its extension picking the format; `ALPACA_URL` is checked against the Stanford Alpaca
              file;
            - a Google Drive link, downloaded once with gdown the same way (JSON or JSONL: it has no
            extension);
            - a Hugging Face dataset id such as "tatsu-lab/alpaca": the train split of
            `datasets.load_dataset`. "owner/name" is read as a local file when the file or its
            folder exists.
        cache_dir: folder for downloads and the Hugging Face cache (`cache_dir/hf`); created if
            missing.
        fields: {Alpaca field: the data's column}, e.g. {"instruction": "prompt", "output":
            "completion"} (DATA_FIELDS): those columns are renamed to the Alpaca fields; other
            fields keep their own name.

    Returns:
        The records as parsed and renamed, not yet validated: a `Records` list, whose `where(i)`
        names record i for `validate_records`'s messages.

    Raises:
        DataError: the file is missing, unreadable, not UTF-8 or not valid JSON/JSONL/CSV/Parquet; a
            download fails or does not match the expected size; the dataset cannot be loaded;
            `fields` names an unknown Alpaca field or a column that no record has.
    """
    source = str(source).strip()
    if not source:
        raise DataError(f"data source is empty: give a {'/'.join(FORMATS)} path, an http(s) URL, a "
                        f"Google Drive link or a Hugging Face dataset id")
    cache_dir = Path(cache_dir)
    hf_cache = cache_dir / "hf"
    url = urllib.parse.urlparse(source)
    path = Path(source).expanduser()
    # "owner/name" is a hub id unless it names something local: an existing file, a known extension,
    # or a file in an existing folder ("data/alpaca" with a missing extension should say "file not
    # found").
    looks_local = path.exists() or path.suffix.lower() in FORMATS or path.parent.is_dir()
    if url.scheme.lower() in ("http", "https"):
        gdrive = (url.hostname or "").lower() in _GDRIVE_HOSTS
        dest = _cache_path(cache_dir, source, "gdrive-" if gdrive else "")
        records = _cached_download(source, dest, _fetch_gdrive if gdrive else _fetch_http, hf_cache)
    elif looks_local or not _HF_DATASET_ID.match(source):
        records = _read_records_file(path, source, hf_cache)
    else:
        records = _load_hf_dataset(source, hf_cache)
    return _apply_fields(records, dict(fields or {}), source)


def _apply_fields(records: Records, fields: dict[str, str], label: str) -> Records:
    """Rename each record's mapped columns to their Alpaca fields (DATA_FIELDS), once the map is
    checked: Alpaca fields only, each from its own column, one that some record has. A column that
        already has the name of a mapped
    field is dropped: the map says which column holds that field."""
    if not fields:
        return records
    found = {key: None for record in records if isinstance(record, dict) for key in record}
    for field, column in fields.items():
        if field not in ALPACA_FIELDS:
            raise DataError(f"DATA_FIELDS: unknown field '{field}' (the Alpaca fields are "
                            f"{_names(ALPACA_FIELDS)})")
        if list(fields.values()).count(column) > 1:
            raise DataError(f"DATA_FIELDS: column '{column}' is mapped to more than one field")
        if found and column not in found:
            raise DataError(f"{label}: DATA_FIELDS maps {field} to column '{column}', which no "
                            f"record has (found: {_names(found)})")
    inverse = {column: field for field, column in fields.items()}
    renamed = [{inverse.get(k, k): v for k, v in r.items() if k in inverse or k not in fields}
               if isinstance(r, dict) else r for r in records]
    mapped = Records(renamed, records.unit, records.numbers, fields)
    # named in the banner as not used
    mapped.dropped = [k for k in found if k in fields and k not in inverse]
    return mapped


def _read_records_file(path: Path, label: str, hf_cache: Path,
                       suffix: str | None = None) -> Records:
    """Read a .json, .jsonl, .csv or .parquet file; `label` names it in messages and `suffix`
    overrides the extension that decides the format (for temp files); other names are read as JSON
    or JSONL."""
    if path.is_dir():
        raise DataError(f"{label}: is a directory, expected a {'/'.join(FORMATS)} file")
    if not path.exists():
        raise DataError(f"{label}: file not found")
    suffix = (suffix if suffix is not None else path.suffix).lower()
    if suffix == ".parquet":
        return Records(_load_with_datasets("parquet", path, label, hf_cache), "row")
    text = _read_text(path, label)
    if suffix == ".csv":
        return _read_csv(path, text, label, hf_cache)
    # Downloads may have no useful extension: a JSON list starts with "[", JSONL with "{".
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        return _read_jsonl(text, label)
    data = _parse_json(text, label, whole_file=True)
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a JSON list of records at the top level, got "
                        f"{_type_name(data)}")
    return Records(data, "record")


def _read_text(path: Path, label: str) -> str:
    """The file's text, with an unreadable, non-UTF-8 or empty file as one DataError."""
    try:
        raw = path.read_bytes()
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
    return text


def _read_jsonl(text: str, label: str) -> Records:
    """One JSON value per line; blank lines are skipped, so each record keeps its own line
    number."""
    records, lines = [], []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028/U+0085, which splitlines
    # breaks on.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            records.append(_parse_json(line, f"{label}: line {lineno}", whole_file=False))
            lines.append(lineno)
    return Records(records, "line", lines)


def _read_csv(path: Path, text: str, label: str, hf_cache: Path) -> Records:
    """Rows of a CSV file with a header line, every cell read as text ("" when empty, and "NA" or
    "None" stay words, not nulls), each numbered by the line it starts on."""
    header, starts = _csv_layout(text, label)
    if not starts:
        return Records([], "line")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    rows = _load_with_datasets("csv", path, label, hf_cache, features=features, na_filter=False)
    # The csv module and pandas agree on well-formed files; should they ever differ, count records
    # instead.
    return Records(rows, "line", starts) if len(rows) == len(starts) else Records(rows)


def _csv_layout(text: str, label: str) -> tuple[list[str], list[int]]:
    """The header and the line each record starts on, as an editor numbers lines: a quoted cell may
    hold line breaks, so record k is not simply on line k + 1. A row with the wrong number of cells
    is refused by line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, starts, line = None, [], 1
    try:
        for row in reader:
            if row and header is None:
                header = row
                if len(set(row)) < len(row) or not all(name.strip() for name in row):
                    raise DataError(f"{label}: line {line}: a column name is empty or repeated in "
                                    f"the header: {_names(row)}")
                if delimiter := _other_delimiter(row):
                    raise DataError(f"{label}: line {line}: the header is one column, {row[0]!r}: "
                                    f"is the delimiter {delimiter!r}? CSV files must be "
                                    "comma-separated")
            elif row:  # blank lines are skipped, as pandas does
                if len(row) != len(header):
                    raise DataError(f"{label}: line {line}: {len(row)} cells, but the header has "
                                    f"{len(header)}")
                starts.append(line)
            line = reader.line_num + 1
    except csv.Error as e:
        unclosed = (" (a quoted cell that starts on this line is never closed)"
                    if "end of data" in str(e) else "")
        raise DataError(f"{label}: line {line}: malformed CSV: {e}{unclosed}") from None
    return header, starts


def _other_delimiter(header: list[str]) -> str | None:
    """The delimiter a one-column header seems to use instead of commas (a spreadsheet's ";" or
    tab), else None: the Alpaca fields need at least two columns, so one column holding ";" is a
    file split on the wrong character."""
    if len(header) != 1:
        return None
    counts = {d: header[0].count(d) for d in (";", "\t", "|")}
    found = max(counts, key=counts.get)
    return found if counts[found] else None


def _load_with_datasets(builder: str, path: Path, label: str, hf_cache: Path,
                        **options) -> list[dict]:
    """The rows of a local file read by datasets' packaged `builder` ("csv", "parquet"); any failure
    is a DataError."""
    try:
        with quiet_datasets(log_errors=False):
            return datasets.load_dataset(builder, data_files=str(path), split="train",
                                         cache_dir=str(hf_cache), **options).to_list()
    # pandas, pyarrow and datasets each raise their own; all mean "cannot read the file"
    except Exception as e:
        cause = e.__cause__ or e  # datasets wraps the reader's error in a DatasetGenerationError
        raise DataError(f"{label}: cannot read the {builder} file: {_first_line(cause)}") from None


def _cache_path(cache_dir: Path, url: str, prefix: str = "") -> Path:
    """Where a download of `url` is kept: readable name (with its extension) plus a hash of the full
    URL."""
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


def _cached_download(url: str, dest: Path, fetch, hf_cache: Path) -> Records:
    """Records of `url`, downloaded once to `dest`; later calls read `dest` without touching the
    network.

    `fetch(url, tmp)` writes the body to a temporary file beside `dest`, which is parsed and checked
    before it is renamed to `dest` (atomic.atomic_write), so a failed, cut-off or malformed download
    never enters the cache. Concurrent processes (DDP ranks) each write their own; the last rename
    wins, with the same content.
    """
    if dest.exists():
        label = f"{url} (cached as {dest})"
        records = _read_records_file(dest, label, hf_cache)
        try:
            _check_alpaca(url, dest, records, label)
        except DataError as e:
            raise DataError(f"{e}; delete the cached file to download it again") from None
        return records
    with atomic_write(dest) as tmp:
        fetch(url, tmp)
        records = _read_records_file(tmp, url, hf_cache, suffix=dest.suffix)
        _check_alpaca(url, tmp, records, url)
    return records


def _fetch_http(url: str, tmp: Path) -> None:
    """Download `url` to `tmp` with urllib; any failure is a DataError."""
    request = urllib.request.Request(url, headers={"User-Agent": "alpaca-lora-course"})
    try:
        with (urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
              open(tmp, "xb") as f):
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
    # A connection closed early can end the body without an exception: compare with the announced
    # size.
    if expected is not None and expected.isdigit() and received != int(expected):
        raise DataError(f"{url}: download failed: received {received:,} of {int(expected):,} bytes")


def _fetch_gdrive(url: str, tmp: Path) -> None:
    """Download a Google Drive file to `tmp` with gdown (it handles Drive's confirmation pages)."""
    import gdown  # imported here: it pulls in requests, and most runs never need it

    try:
        gdown.download(url, output=str(tmp), quiet=True, timeout=DOWNLOAD_TIMEOUT_S)
    except Exception as e:  # gdown raises its own errors, requests' and OSError; all mean "failed"
        raise DataError(f"{url}: Google Drive download failed: {_first_line(e)}") from None
    if not tmp.is_file():
        raise DataError(f"{url}: Google Drive download produced no file (is the link shared "
                        "publicly?)")


def _load_hf_dataset(name: str, hf_cache: Path) -> Records:
    """Load the train split of a Hugging Face dataset; its rows are numbered from 1."""
    try:
        with quiet_datasets():
            dataset = datasets.load_dataset(name, cache_dir=str(hf_cache))
    # hub, network, missing-dataset and format errors alike are user-facing here
    except Exception as e:
        raise DataError(f"{name}: cannot load Hugging Face dataset: {_first_line(e)}") from None
    if "train" not in dataset:
        raise DataError(f"{name}: Hugging Face dataset has no 'train' split (it has "
                        f"{sorted(dataset)})")
    return Records(dataset["train"].to_list(), "row")
