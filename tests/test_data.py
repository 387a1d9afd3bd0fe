"""Tests for support/data_sources.py (loading) and support/alpaca_data.py: validation, tokenization and its cache,
splitting, padding, sampling."""

import csv
import http.server
import json
import logging
import math
import os
import random
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prompter import Prompter  # noqa: E402
from support import alpaca_data as ad # noqa: E402
from support import data_sources as sources # noqa: E402
from support.data_sources import DataError # noqa: E402

datasets.disable_progress_bars()
SAMPLE = sources.DEBUG_SAMPLE
EMPTY_OUTPUT_INDICES = [284, 1223, 1347, 1736]  # see data/README.md


def good(i=0):
    return {"instruction": f"Do task {i}.", "input": "", "output": f"Done {i}."}


def load_and_validate(path, cache_dir):
    return ad.validate_records(sources.load_records(str(path), cache_dir), str(path))


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------
# The shipped sample
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    raw = json.loads(SAMPLE.read_text(encoding="utf-8"))
    clean, stats = ad.validate_records(sources.load_records(str(SAMPLE), "unused-cache"), str(SAMPLE))
    return raw, clean, stats


def test_sample_loads_with_known_quirks_fixed(sample):
    raw, clean, stats = sample
    assert len(raw) == 2000 and stats["records"] == 2000
    assert stats["empty_output_dropped"] == 4 and stats["kept"] == 1996 == len(clean)
    assert stats["placeholder_inputs"] == 24
    # Instructions are unique in the sample, so they identify which records were dropped.
    kept = {r["instruction"] for r in clean}
    dropped = [i for i, r in enumerate(raw) if r["instruction"] not in kept]
    assert dropped == EMPTY_OUTPUT_INDICES
    placeholders = [i for i, r in enumerate(raw) if r["input"] in ("Noinput", "No input.", "<no input>")]
    assert len(placeholders) == 24
    by_instruction = {r["instruction"]: r for r in clean}
    assert all(by_instruction[raw[i]["instruction"]]["input"] == "" for i in placeholders)
    assert all(list(r) == ["instruction", "input", "output"] for r in clean)
    assert stats["with_input"] == sum(1 for r in clean if r["input"])
    assert "1,996 kept" in ad.data_stats_line(stats)


@pytest.mark.parametrize("text", ["Noinput", "No input.", "<no input>", " NO INPUT ", "no_input", "(No Input)",
                                  "   "])
def test_placeholder_inputs_become_empty(text):
    clean, stats = ad.validate_records([{"instruction": "x", "input": text, "output": "y"}], "mem")
    assert clean[0]["input"] == "" and stats["placeholder_inputs"] == 1


@pytest.mark.parametrize("text", ["None", "N/A", "no input needed", "0"])
def test_real_inputs_are_kept(text):
    clean, stats = ad.validate_records([{"instruction": "x", "input": text, "output": "y"}], "mem")
    assert clean[0]["input"] == text and stats["placeholder_inputs"] == 0


def test_absent_or_null_input_means_no_input():
    clean, _ = ad.validate_records([{"instruction": "a", "output": "b"},
                                    {"instruction": "c", "input": None, "output": "d", "extra": 1}], "mem")
    assert clean == [{"instruction": "a", "input": "", "output": "b"},
                     {"instruction": "c", "input": "", "output": "d"}]


def test_all_outputs_empty_is_an_error():
    with pytest.raises(DataError) as e:
        ad.validate_records([{"instruction": "a", "output": " "}], "mem.json")
    assert_one_line(e, "mem.json", "empty output")


# ---------------------------------------------------------------------------------------------------------
# Malformed files: one-line DataError naming the file and, where it applies, the line, record or row (from 1)
# ---------------------------------------------------------------------------------------------------------

TRUNCATED = SAMPLE.read_text(encoding="utf-8")[:500]
# A JSON list's records are "record N", a JSONL file's "line N", both counted from 1 as an editor shows them.
MALFORMED = {
    "truncated_json": ("x.json", TRUNCATED, ["invalid JSON at line"]),
    "top_level_object": ("x.json", json.dumps({"data": [good()]}), ["expected a JSON list", "got dict"]),
    "record_not_object": ("x.json", json.dumps([good(), "text"]), ["record 2: ", "got str"]),
    "missing_instruction": ("x.json", json.dumps([good(), {"output": "o"}]),
                            ["record 2: missing 'instruction' (the record has: output; expected: "]),
    "missing_output": ("x.json", json.dumps([good(), good(), {"instruction": "i"}]),
                       ["record 3: missing 'output'"]),
    "int_instruction": ("x.json", json.dumps([{"instruction": 5, "output": "o"}]),
                        ["record 1: 'instruction' must be a string, got int"]),
    "int_output": ("x.json", json.dumps([good()] * 17 + [{"instruction": "i", "output": 3}]),
                   ["record 18: 'output' must be a string, got int"]),
    "list_input": ("x.json", json.dumps([{"instruction": "i", "input": ["a"], "output": "o"}]),
                   ["record 1: 'input' must be a string, got list"]),
    "blank_instruction": ("x.json", json.dumps([{"instruction": " ", "output": "o"}]),
                          ["record 1: 'instruction' is empty"]),
    "empty_list": ("x.json", "[]", ["no records"]),
    "empty_file": ("x.json", "", ["empty"]),
    "jsonl_bad_line": ("x.jsonl", json.dumps(good()) + "\n\n" + '{"instruction": "i", "output": \n',
                       ["line 3", "invalid JSON"]),
    "jsonl_record_not_object": ("x.jsonl", json.dumps(good()) + "\n[1, 2]\n", ["line 2: ", "got list"]),
    "jsonl_missing_after_blank_line": ("x.jsonl", json.dumps(good()) + "\n\n" + '{"output": "o"}\n',
                                       ["line 3: missing 'instruction'"]),
    "empty_csv": ("x.csv", "", ["the file is empty"]),
    "csv_header_only": ("x.csv", "instruction,output\n", ["no records"]),
    "csv_ragged_row": ("x.csv", "instruction,output\na,b\nc,d,e\n", ["line 3: 3 cells, but the header has 2"]),
    "csv_open_quote": ("x.csv", 'instruction,output\na,b\nc,"d\ne,f\n',
                       ["line 3: malformed CSV", "a quoted cell that starts on this line is never closed"]),
    "csv_repeated_column": ("x.csv", "instruction,output,output\na,b,c\n",
                            ["line 1: a column name is empty or repeated in the header: instruction, output, output"]),
    "csv_unnamed_column": ("x.csv", "instruction,,output\na,b,c\n", ["line 1: a column name is empty"]),
    # A spreadsheet's ";" (or tab) CSV: one column named "instruction;output"; a comma in a cell made 2 cells.
    "csv_semicolons": ("x.csv", "instruction;output\nSay hi, twice;hi hi\n",
                       ["line 1: the header is one column, 'instruction;output': is the delimiter ';'? CSV files "
                        "must be comma-separated"]),
    "csv_tabs": ("x.csv", "instruction\toutput\nSay hi\thi\n", ["is the delimiter '\\t'? CSV files must be"]),
    "csv_blank_instruction": ("x.csv", "instruction,output\na,b\n,d\n", ["line 3: 'instruction' is empty"]),
    "not_parquet": ("x.parquet", '[{"instruction": "i", "output": "o"}]',
                    ["cannot read the parquet file: ArrowInvalid: ", "not a parquet file"]),
    "empty_parquet": ("x.parquet", "", ["cannot read the parquet file: ArrowInvalid: Parquet file size is 0 bytes"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_gives_one_line_data_error(case, tmp_path):
    name, text, fragments = MALFORMED[case]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_and_validate(path, tmp_path / "cache")
    assert_one_line(e, str(path), *fragments)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[\n{"instruction": "caf\u00e9", "output": "o"}]'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_and_validate(path, tmp_path)
    assert_one_line(e, str(path), "not valid UTF-8 at line 2")


def test_missing_file_is_not_mistaken_for_a_dataset_id(tmp_path, monkeypatch):
    path = tmp_path / "nope.json"
    with pytest.raises(DataError) as e:
        sources.load_records(str(path), tmp_path)
    assert_one_line(e, str(path), "file not found")
    # "data/nope" has the shape of a hub id, but data/ is a local folder, so it is a missing file.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(DataError) as e:
        sources.load_records("data/nope", tmp_path)
    assert_one_line(e, "data/nope: file not found")


def test_jsonl_and_bom_and_unicode_line_separators(tmp_path):
    records = [good(0), {"instruction": "a\u2028b", "input": "c\u0085d", "output": "e"}]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    assert sources.load_records(str(path), tmp_path) == records
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert sources.load_records(str(bom), tmp_path) == records


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = st.sampled_from(["instruction", "input", "output", "text"])
RECORDS = st.lists(
    st.one_of(
        st.dictionaries(FIELDS, st.one_of(st.text(max_size=10), JSON_VALUES), max_size=4),
        st.fixed_dictionaries({"instruction": st.text(max_size=5), "output": st.text(max_size=5)},
                              optional={"input": st.one_of(st.text(max_size=5), JSON_VALUES)}),
        JSON_VALUES,
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=RECORDS)
def test_fuzz_validate_accepts_or_raises_one_line_data_error(records):
    try:
        clean, stats = ad.validate_records(records, "fuzz.json")
    except DataError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.json: ")
        return
    assert stats["kept"] + stats["empty_output_dropped"] == stats["records"] == len(records)
    for r in clean:
        assert list(r) == ["instruction", "input", "output"] and all(isinstance(v, str) for v in r.values())
        assert r["instruction"].strip() and r["output"].strip()


# ---------------------------------------------------------------------------------------------------------
# Formats (.json, .jsonl, .csv, .parquet), the field map (DATA_FIELDS), how records are numbered
# ---------------------------------------------------------------------------------------------------------

# Cells that trip up naive CSV handling: a comma, quotes, a line break inside a cell, non-ASCII text, an empty
# input, and words that pandas reads as nulls ("None", "N/A", "NA") or numbers ("3") unless told not to.
THREE = [
    {"instruction": 'Say "hi", twice.', "input": "", "output": "hi\nhi"},
    {"instruction": "Répète : NA", "input": "None", "output": "N/A"},
    {"instruction": "Count.", "input": "1, 2", "output": "3"},
]
PROMPTS = [{"prompt": r["instruction"], "completion": r["output"]} for r in THREE]
PROMPT_FIELDS = {"instruction": "prompt", "output": "completion"}


def write_records(path, records):
    """Write `records` (dicts with the same keys) in the format of `path`'s extension; returns str(path)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return str(path)


def test_the_same_records_load_alike_from_every_format(tmp_path):
    loaded = {suffix: sources.load_records(write_records(tmp_path / f"three{suffix}", THREE), tmp_path / "cache")
              for suffix in sources.FORMATS}
    for suffix, records in loaded.items():
        assert records == THREE and ad.validate_records(records, suffix)[0] == THREE, suffix
    # Each names record i as an editor or viewer shows it, from 1; the first CSV record spans lines 2 and 3.
    assert [loaded[".json"].where(i) for i in range(3)] == ["record 1", "record 2", "record 3"]
    assert [loaded[".jsonl"].where(i) for i in range(3)] == ["line 1", "line 2", "line 3"]
    assert [loaded[".csv"].where(i) for i in range(3)] == ["line 2", "line 4", "line 5"]
    assert [loaded[".parquet"].where(i) for i in range(3)] == ["row 1", "row 2", "row 3"]


@pytest.mark.parametrize("suffix, where", [(".json", "record 3"), (".jsonl", "line 3"), (".csv", "line 5"),
                                           (".parquet", "row 3")])
def test_a_bad_record_is_named_as_the_file_numbers_it(tmp_path, suffix, where):
    blank = {"instruction": " ", "input": "", "output": "o"}
    path = write_records(tmp_path / f"bad{suffix}", [THREE[0], good(1), blank])
    with pytest.raises(DataError) as e:
        load_and_validate(path, tmp_path / "cache")
    assert str(e.value) == f"{path}: {where}: 'instruction' is empty"


@pytest.mark.parametrize("suffix, first", [(".csv", "line 2"), (".parquet", "row 1"), (".jsonl", "line 1")])
def test_field_map_reads_other_column_names(tmp_path, suffix, first):
    path = write_records(tmp_path / f"prompts{suffix}", PROMPTS)
    clean, _ = ad.validate_records(sources.load_records(path, tmp_path / "cache", PROMPT_FIELDS), path)
    assert clean == [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in THREE]
    with pytest.raises(DataError) as e:  # without the map: what the record has, what is expected, how to map
        load_and_validate(path, tmp_path / "cache")
    assert str(e.value) == (f"{path}: {first}: missing 'instruction' (the record has: prompt, completion; expected: "
                            "instruction, output, and optionally input); map other names with "
                            "DATA_FIELDS=instruction=...,output=...")


def test_field_map_mistakes_are_named(tmp_path):
    path = write_records(tmp_path / "prompts.jsonl", PROMPTS + [{"completion": "c"}])
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:  # a mapped column that no record has
        sources.load_records(path, cache, {"instruction": "question", "output": "completion"})
    assert str(e.value) == (f"{path}: DATA_FIELDS maps instruction to column 'question', which no record has "
                            "(found: prompt, completion)")
    with pytest.raises(DataError) as e:  # a mapped column that one record lacks: the message uses the data's names
        ad.validate_records(sources.load_records(path, cache, PROMPT_FIELDS), path)
    assert str(e.value) == (f"{path}: line 4: missing 'prompt', which DATA_FIELDS maps to instruction "
                            "(the record has: completion)")
    numbers = write_records(tmp_path / "numbers.json", [{"prompt": 5, "completion": "c"}])
    with pytest.raises(DataError) as e:
        ad.validate_records(sources.load_records(numbers, cache, PROMPT_FIELDS), numbers)
    assert str(e.value) == f"{numbers}: record 1: 'prompt' must be a string, got int"
    for fields, message in [({"prompt": "x"}, "DATA_FIELDS: unknown field 'prompt' (the Alpaca fields are "
                                              "instruction, input, output)"),
                            ({"instruction": " "}, f"{path}: DATA_FIELDS maps instruction to column ' ', which no "
                                                   "record has (found: prompt, completion)"),
                            ({"instruction": "prompt", "input": "prompt"},
                             "DATA_FIELDS: column 'prompt' is mapped to more than one field")]:
        with pytest.raises(DataError) as e:
            sources.load_records(path, cache, fields)
        assert str(e.value) == message


def test_field_map_picks_the_column_over_one_with_the_alpaca_name(tmp_path):
    path = write_records(tmp_path / "both.csv", [{"instruction": "old", "prompt": "new", "output": "o", "input": "i"}])
    assert sources.load_records(path, tmp_path, {"instruction": "prompt"}) == [{"instruction": "new", "output": "o",
                                                                                 "input": "i"}]


# ---------------------------------------------------------------------------------------------------------
# Sources: URL download, Google Drive, Hugging Face
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; `requests` lists the paths it was asked for."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if self.path == "/cut.json":  # announces 1,000 bytes, sends 10, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'[{"instruc')
                self.wfile.flush()
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, requests=requests, url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.shutdown()
    httpd.server_close()


def downloads(cache):
    folder = cache / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_url_is_downloaded_once_via_temp_file_and_rename(server, tmp_path, monkeypatch):
    records = [good(0), good(1)]
    (server.root / "data.json").write_text(json.dumps(records))
    cache = tmp_path / "cache"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))),
                                                          real_replace(src, dst))[1])
    assert sources.load_records(f"{server.url}/data.json", cache) == records
    [(src, dst)] = renames
    assert src.parent == dst.parent == cache / "downloads" and src.name.startswith(".") and dst.is_file()
    assert downloads(cache) == [dst.name]  # no temp file left behind
    assert sources.load_records(f"{server.url}/data.json", cache) == records
    assert server.requests == ["/data.json"]  # the second call used the cache


def test_url_errors_leave_no_file_in_the_cache(server, tmp_path):
    cache = tmp_path / "cache"
    (server.root / "page.json").write_text("<html>Not the raw file</html>")
    for path, fragment in [("/missing.json", "HTTP 404"), ("/cut.json", "received 10 of 1,000 bytes"),
                           ("/page.json", "invalid JSON at line 1")]:
        with pytest.raises(DataError) as e:
            sources.load_records(server.url + path, cache)
        assert_one_line(e, server.url + path, fragment)
    assert downloads(cache) == []
    with pytest.raises(DataError) as e:  # nothing listening
        sources.load_records(server.url.rsplit(":", 1)[0] + ":9/x.json", cache)
    assert_one_line(e, "download failed")


def test_url_ending_in_csv_or_parquet_is_read_as_such(server, tmp_path):
    cache = tmp_path / "cache"
    for name in ("three.csv", "three.parquet"):
        write_records(server.root / name, THREE)
        assert sources.load_records(f"{server.url}/{name}", cache) == THREE
        records = sources.load_records(f"{server.url}/{name}", cache)  # from the cache, numbered the same
        assert records == THREE and records.where(1) == ("line 4" if name.endswith(".csv") else "row 2")
    assert server.requests == ["/three.csv", "/three.parquet"]
    assert sorted(Path(name).suffix for name in downloads(cache)) == [".csv", ".parquet"]


def test_alpaca_url_is_size_and_count_checked(server, tmp_path, monkeypatch):
    body = json.dumps([good(0), good(1), good(2)]).encode()
    (server.root / "alpaca_data.json").write_bytes(body)
    url = f"{server.url}/alpaca_data.json"
    monkeypatch.setattr(sources, "ALPACA_URL", url)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:  # ALPACA_BYTES is the real 22 MB file's size
        sources.load_records(url, cache)
    assert_one_line(e, url, f"{len(body):,} bytes, expected {sources.ALPACA_BYTES:,}")
    assert downloads(cache) == []

    monkeypatch.setattr(sources, "ALPACA_BYTES", len(body))
    monkeypatch.setattr(sources, "ALPACA_RECORDS", 4)
    with pytest.raises(DataError) as e:
        sources.load_records(url, cache)
    assert_one_line(e, url, "3 records, expected 4")
    monkeypatch.setattr(sources, "ALPACA_RECORDS", 3)
    assert len(sources.load_records(url, cache)) == 3
    monkeypatch.setattr(sources, "ALPACA_BYTES", len(body) + 1)  # a cached file is checked too
    with pytest.raises(DataError) as e:
        sources.load_records(url, cache)
    assert_one_line(e, "cached as", "delete the cached file")


def test_google_drive_link_goes_through_gdown(tmp_path, monkeypatch):
    import gdown

    calls = []

    def fake_download(url, output, **kwargs):
        calls.append(url)
        Path(output).write_text(json.dumps([good()]))
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    link = "https://drive.google.com/file/d/1AbCdEfGhIjKlMnOpQrStUvWxYz012345/view?usp=sharing"
    assert sources.load_records(link, tmp_path) == [good()]
    assert sources.load_records(link, tmp_path) == [good()]
    assert calls == [link]

    def failing_download(url, output, **kwargs):
        raise gdown.exceptions.FileURLRetrievalError("Cannot retrieve the public link.\nCheck permissions.")

    monkeypatch.setattr(gdown, "download", failing_download)
    with pytest.raises(DataError) as e:
        sources.load_records(link.replace("1AbC", "9ZyX"), tmp_path)
    assert_one_line(e, "drive.google.com", "FileURLRetrievalError", "Cannot retrieve the public link.")


def test_hugging_face_id_goes_through_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list([good(0), good(1)])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = sources.load_records("tatsu-lab/alpaca", tmp_path)
    assert records == [good(0), good(1)] and records.where(1) == "row 2"
    assert calls == ["tatsu-lab/alpaca"]

    def failing_load_dataset(name, **kwargs):
        raise ConnectionError("offline\nmode")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError) as e:
        sources.load_records("someone/missing", tmp_path)
    assert_one_line(e, "someone/missing", "ConnectionError: offline")


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------

TINY_BLOOM = ROOT / "models" / "tiny-bloom"  # BLOOM-style byte-level BPE, <unk> <s> </s> <pad> = 0-3


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_BLOOM)


@pytest.fixture(scope="module")
def records(sample):
    return sample[1][:120]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def token_ids(tokenizer, record):
    """Prompt and response ids, each tokenized on its own the plain way."""
    prompt = Prompter().generate_prompt(record["instruction"], record["input"])
    return tokenizer(prompt)["input_ids"], tokenizer(record["output"], add_special_tokens=False)["input_ids"]


def token_counts(tokenizer, record):
    return tuple(len(ids) for ids in token_ids(tokenizer, record))


def test_prompt_tokens_carry_no_label(tokenizer, records, cache):
    ds = ad.tokenize_records(records, tokenizer, Prompter(), 512, False, cache)
    assert ds.column_names == ["input_ids", "labels", "length"] and len(ds) == len(records)
    checked = 0
    for record, example in zip(records, ds):
        ids, labels = example["input_ids"], example["labels"]
        prompt_ids, response_ids = token_ids(tokenizer, record)
        n_prompt, n_response = len(prompt_ids), len(response_ids)
        if n_prompt + n_response >= 512:  # truncated: see test_truncation_and_eos_only_when_it_fits
            continue
        checked += 1
        assert ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert example["length"] == len(ids) == len(labels)
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        labelled = [t for t in labels if t != -100]
        assert tokenizer.decode(labelled) == record["output"] + "</s>"
        assert tokenizer.decode(ids[:n_prompt]) == Prompter().generate_prompt(record["instruction"], record["input"])
    assert checked > 0.9 * len(records)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_train_on_inputs_labels_everything(tokenizer, records, cache):
    ds = ad.tokenize_records(records, tokenizer, Prompter(), 512, True, cache)
    for record, example in zip(records, ds):
        assert example["labels"] == example["input_ids"]
        full = Prompter().generate_prompt(record["instruction"], record["input"], record["output"]) + "</s>"
        assert tokenizer.decode(example["input_ids"]) == full[:len(tokenizer.decode(example["input_ids"]))]
    assert sum(example["input_ids"][-1] == tokenizer.eos_token_id for example in ds) > 0.9 * len(ds)


def test_truncation_and_eos_only_when_it_fits(tokenizer, records, tmp_path):
    record = records[0]
    n_prompt, n_response = token_counts(tokenizer, record)
    n = n_prompt + n_response
    for max_length, expect_len, expect_eos in [(n + 1, n + 1, True), (n + 5, n + 1, True), (n, n, False),
                                               (n - 3, n - 3, False)]:
        stats = {}
        [example] = ad.tokenize_records([record], tokenizer, Prompter(), max_length, False, tmp_path, stats=stats)
        assert example["length"] == expect_len, max_length
        assert (example["input_ids"][-1] == tokenizer.eos_token_id) == expect_eos, max_length
        assert stats["truncated"] == (n > max_length)


def test_examples_with_no_response_token_are_dropped(tokenizer, records, tmp_path):
    short = min(records, key=lambda r: token_counts(tokenizer, r)[0])
    n_short = token_counts(tokenizer, short)[0]
    longer = [r for r in records if token_counts(tokenizer, r)[0] >= n_short + 2]
    stats = {}
    ds = ad.tokenize_records([short] + longer, tokenizer, Prompter(), n_short + 2, False, tmp_path, stats=stats)
    assert len(ds) == 1 and stats["no_label_dropped"] == len(longer) > 0
    with pytest.raises(DataError, match="raise MAX_LENGTH"):
        ad.tokenize_records(longer, tokenizer, Prompter(), n_short + 2, False, tmp_path)


def test_answers_cut_away_by_max_length_are_counted_and_none_left_is_refused(tokenizer, records, tmp_path):
    """TRAIN_ON_INPUTS=true (the default) keeps an example whose prompt fills MAX_LENGTH, for its prompt alone: the
    banner counts them, and a file where no example keeps a response token is refused as TRAIN_ON_INPUTS=false
    refuses it."""
    short = min(records, key=lambda r: token_counts(tokenizer, r)[0])
    max_length = token_counts(tokenizer, short)[0] + 2
    longer = [r for r in records if token_counts(tokenizer, r)[0] >= max_length]
    cut_by_hand = [r for r in [short] + longer if token_counts(tokenizer, r)[0] >= max_length]
    stats = {"source": "mixed.json"}
    ds = ad.tokenize_records([short] + longer, tokenizer, Prompter(), max_length, True, tmp_path, stats=stats)
    assert len(ds) == 1 + len(longer) and stats["answer_cut"] == len(cut_by_hand) == len(longer) > 0
    # The kept examples without an answer are exactly MAX_LENGTH prompt tokens, labels on the prompt only.
    assert sorted(ds["length"])[1:] == [max_length] * len(longer)
    assert ad.answer_cut_warning(stats, max_length) == (
        f"{len(longer)} of {len(longer) + 1} examples lost their whole answer to MAX_LENGTH={max_length} (the prompt "
        "alone fills it) and train on the prompt only; raise MAX_LENGTH, or TRAIN_ON_INPUTS=false drops them")
    assert ad.answer_cut_warning({"answer_cut": 0, "examples": 5}, max_length) == ""
    with pytest.raises(DataError) as e:
        ad.tokenize_records(longer, tokenizer, Prompter(), max_length, True, tmp_path, stats={"source": "long.json"})
    assert_one_line(e, f"long.json: no example keeps a response token within MAX_LENGTH={max_length} tokens: every "
                       "prompt is at least that long; raise MAX_LENGTH or shorten the prompts")


def test_columns_that_are_not_used_are_named(tmp_path):
    """DATA_FIELDS=instruction=prompt,output=answer on a CSV that also has a `context` column: the banner's data line
    names it, not the mapped ones."""
    rows = [{"prompt": r["instruction"], "context": r["input"], "answer": r["output"], "output": "x"} for r in THREE]
    path = write_records(tmp_path / "with_context.csv", rows)
    records = sources.load_records(path, tmp_path / "cache", {"instruction": "prompt", "output": "answer"})
    _, stats = ad.validate_records(records, path)
    assert stats["unused_columns"] == ["output", "context"]  # "output" is replaced by the column DATA_FIELDS maps
    rows = [{k: v for k, v in row.items() if k != "output"} for row in rows]
    path = write_records(tmp_path / "with_context.csv", rows)
    records = sources.load_records(path, tmp_path / "cache", {"instruction": "prompt", "output": "answer"})
    _, stats = ad.validate_records(records, path)
    assert stats["unused_columns"] == ["context"]
    assert ad.data_stats_line(stats).endswith("; columns not used: context")
    _, stats = ad.validate_records(sources.load_records(write_records(tmp_path / "three.csv", THREE),
                                                        tmp_path / "cache"), path)
    assert stats["unused_columns"] == [] and "not used" not in ad.data_stats_line(stats)


def test_preamble_shortcut_matches_plain_tokenization(tokenizer, records):
    prompts = [Prompter().generate_prompt(r["instruction"], r["input"]) for r in records]
    preambles = ad._preamble_ids(tokenizer, Prompter())
    assert len(preambles) == 2  # BLOOM-style split at the blank line: both templates qualify
    assert ad._encode_prompts(tokenizer, prompts, preambles) == tokenizer(prompts)["input_ids"]
    # A tokenizer that appends EOS to every text breaks "preamble ids + rest ids": the check must refuse it.
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    eos_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    assert ad._preamble_ids(eos_tok, Prompter()) == {}
    assert ad._encode_prompts(eos_tok, prompts[:5], {}) == eos_tok(prompts[:5])["input_ids"]


@pytest.fixture
def progress_bars():
    """datasets' progress bars on, as in a normal run (this module turns them off at import), and off again after."""
    datasets.enable_progress_bars()
    yield
    datasets.disable_progress_bars()


def test_datasets_progress_bars_do_not_print(tokenizer, tmp_path, capfd, progress_bars):
    paths = {suffix: write_records(tmp_path / f"three{suffix}", THREE) for suffix in (".csv", ".parquet")}
    datasets.Dataset.from_dict({"a": [1]}).map(lambda row: row, desc="Tokenizing")
    assert "Tokenizing" in capfd.readouterr().err  # the check can see a bar that is not silenced
    for suffix, path in paths.items():
        records = sources.load_records(path, tmp_path / "cache")
        for _ in range(2):  # tokenized and saved, then loaded from the cache
            ad.tokenize_records(ad.validate_records(records, suffix)[0], tokenizer, Prompter(), 64, False, tmp_path)
    printed = capfd.readouterr()
    for text in ("Generating", "Tokenizing", "Saving the dataset", "Loading", "%|"):
        assert text not in printed.err + printed.out
    assert datasets.is_progress_bar_enabled()  # the caller's setting is restored


def test_a_loader_failure_is_only_the_data_error(tmp_path):
    """datasets logs "Failed to read ..." before it raises; the DataError already says it, so the log is silenced.
    (Its own handler may write to a stderr that capfd does not see, so the test listens on the logger.)"""
    logged = []
    listener = logging.Handler()
    listener.emit = logged.append
    logging.getLogger("datasets").addHandler(listener)
    (tmp_path / "text.parquet").write_text("not a table")
    try:
        with pytest.raises(DataError):
            sources.load_records(str(tmp_path / "text.parquet"), tmp_path / "cache")
    finally:
        logging.getLogger("datasets").removeHandler(listener)
    assert [record.getMessage() for record in logged] == []


class CountingMap:
    """Wraps ad._tokenize_batch to count how often datasets.map calls it."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ad._tokenize_batch

        def wrapper(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ad, "_tokenize_batch", wrapper)


def test_second_call_loads_from_cache(tokenizer, records, tmp_path, monkeypatch):
    counter = CountingMap(monkeypatch)
    first = ad.tokenize_records(records, tokenizer, Prompter(), 128, False, tmp_path)
    assert counter.calls == 1
    [folder] = (tmp_path / "tokenized").iterdir()  # no temp folder left behind
    stamp = (folder / "alpaca_meta.json").stat().st_mtime_ns
    stats = {}
    second = ad.tokenize_records(list(records), tokenizer, Prompter(), 128, False, tmp_path, stats=stats)
    assert counter.calls == 1 and (folder / "alpaca_meta.json").stat().st_mtime_ns == stamp
    assert second[:] == first[:] and stats["examples"] == len(first)
    assert stats["fingerprint"] == folder.name == ad.tokenize_fingerprint(records, tokenizer, Prompter(), 128, False)[0]


class OtherPrompter(Prompter):
    TEMPLATE_NO_INPUT = Prompter.TEMPLATE_NO_INPUT.replace("Below", "Here")


def test_cache_key_covers_every_input(tokenizer, records):
    from transformers import AutoTokenizer

    base = ad.tokenize_fingerprint(records, tokenizer, Prompter(), 128, False)[0]
    grown = AutoTokenizer.from_pretrained(TINY_BLOOM)
    grown.add_tokens(["<extra>"])
    edited = [dict(r) for r in records]
    edited[7]["output"] += "!"
    variants = {
        "records": ad.tokenize_fingerprint(edited, tokenizer, Prompter(), 128, False)[0],
        "max_length": ad.tokenize_fingerprint(records, tokenizer, Prompter(), 129, False)[0],
        "train_on_inputs": ad.tokenize_fingerprint(records, tokenizer, Prompter(), 128, True)[0],
        "template": ad.tokenize_fingerprint(records, tokenizer, OtherPrompter(), 128, False)[0],
        "vocab": ad.tokenize_fingerprint(records, grown, Prompter(), 128, False)[0],
    }
    assert all(fp != base for fp in variants.values()), variants
    assert len(set(variants.values())) == len(variants)
    # The same tokenizer loaded again, or after a call that set truncation and padding, gives the same key.
    again = AutoTokenizer.from_pretrained(TINY_BLOOM)
    again(["a b c"], truncation=True, max_length=2, padding="max_length")
    assert ad.tokenize_fingerprint(records, again, Prompter(), 128, False)[0] == base


def test_failed_write_publishes_nothing(tokenizer, records, tmp_path, monkeypatch):
    def broken_save(self, path, **kwargs):
        Path(path, "partial.arrow").write_bytes(b"xx")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ad.tokenize_records(records[:5], tokenizer, Prompter(), 128, False, tmp_path)
    assert list((tmp_path / "tokenized").iterdir()) == []
    monkeypatch.undo()
    assert len(ad.tokenize_records(records[:5], tokenizer, Prompter(), 128, False, tmp_path)) == 5


# ---------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_sized():
    ds = datasets.Dataset.from_dict({"i": list(range(100))})
    train, valid = ad.split_train_valid(ds, 10, seed=1)
    assert len(train) == 90 and len(valid) == 10
    assert sorted(list(train["i"]) + list(valid["i"])) == list(range(100))
    assert list(ad.split_train_valid(ds, 10, seed=1)[1]["i"]) == list(valid["i"])
    assert list(ad.split_train_valid(ds, 10, seed=2)[1]["i"]) != list(valid["i"])
    assert len(ad.split_train_valid(ds, 0.25, seed=1)[1]) == 25
    assert len(ad.split_train_valid(ds, 0, seed=1)[1]) == 0
    with pytest.raises(DataError, match="leaves none of the 100"):
        ad.split_train_valid(ds, 100, seed=1)
    for bad in (1.0, 0.0, -1, True, "10"):
        with pytest.raises(ValueError):
            ad.split_train_valid(ds, bad, seed=1)


# ---------------------------------------------------------------------------------------------------------
# PadCollator
# ---------------------------------------------------------------------------------------------------------

FEATURES = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7, 8, 9, 10], "labels": [7, 8, 9, 10]}]


def test_collator_pads_left_like_bloom():
    batch = ad.PadCollator(SimpleNamespace(pad_token_id=3, padding_side="left", name_or_path="t"))(FEATURES)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[3, 3, 5, 6], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6], [7, 8, 9, 10]]


def test_collator_pads_right_and_to_multiple():
    collate = ad.PadCollator(SimpleNamespace(pad_token_id=0, padding_side="right", name_or_path="t"), 8)
    batch = collate(FEATURES)
    assert batch["input_ids"].tolist()[0] == [5, 6] + [0] * 6
    assert batch["attention_mask"].tolist()[1] == [1] * 4 + [0] * 4
    assert batch["labels"].tolist()[1] == [7, 8, 9, 10] + [-100] * 4


def test_collator_with_real_tokenizer(tokenizer, records, cache):
    ds = ad.tokenize_records(records, tokenizer, Prompter(), 512, False, cache)
    batch = ad.PadCollator(tokenizer)([ds[0], ds[1]])
    short = min(ds[0]["length"], ds[1]["length"])
    row = 0 if ds[0]["length"] == short else 1
    pads = batch["input_ids"].shape[1] - short
    assert tokenizer.padding_side == "left" and pads > 0
    assert (batch["input_ids"][row, :pads] == tokenizer.pad_token_id).all()
    assert batch["input_ids"][row, pads:].tolist() == ds[row]["input_ids"]
    with pytest.raises(ValueError, match="no pad_token"):
        ad.PadCollator(SimpleNamespace(pad_token_id=None, padding_side="left", name_or_path="t"))


# ---------------------------------------------------------------------------------------------------------
# LengthGroupedSampler
# ---------------------------------------------------------------------------------------------------------

_rng = random.Random(0)
LENGTHS = [_rng.randint(20, 500) for _ in range(1001)]


def batches(sampler, batch_size):
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def real_token_fraction(lengths, batch_list):
    return sum(lengths[i] for b in batch_list for i in b) / sum(max(lengths[i] for i in b) * len(b)
                                                                for b in batch_list)


def test_sampler_yields_every_index_once_per_epoch():
    sampler = ad.LengthGroupedSampler(LENGTHS, batch_size=8, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(LENGTHS))) and len(sampler) == len(LENGTHS)
        # DataLoader batches line up with the sorted groups: 1001 % 8 leaves a short group, which must come
        # last, or every batch after it would straddle two groups.
        assert all([LENGTHS[i] for i in b] == sorted((LENGTHS[i] for i in b), reverse=True)
                   for b in batches(sampler, 8))


@pytest.mark.parametrize("n, b", [(1000, 4), (1001, 4), (10, 2), (3, 2)])
def test_two_ranks_see_the_same_global_batches_as_one_process_with_double_batch(n, b):
    lengths = LENGTHS[:n]
    one = batches(ad.LengthGroupedSampler(lengths, 2 * b, 1, 0, seed=5), 2 * b)
    ranks = [ad.LengthGroupedSampler(lengths, b, 2, r, seed=5) for r in (0, 1)]
    dist = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=0, shuffle=True, seed=5)
    assert len(ranks[0]) == len(ranks[1]) == len(dist)  # same padding as DistributedSampler(drop_last=False)
    rank_batches = [batches(s, b) for s in ranks]
    assert len(rank_batches[0]) == len(rank_batches[1])
    merged = [sorted(x + y) for x, y in zip(*rank_batches)]
    if n % 2 == 0:  # one process pads nothing, two ranks pad one index when n is odd
        assert merged == [sorted(batch) for batch in one]
    else:
        assert set(i for batch in merged for i in batch) == set(range(n))
        assert sum(len(batch) for batch in merged) == n + 1
    # Each rank's own batches are length-grouped too: rank 0 and rank 1 split a sorted global batch.
    global_order = ranks[0].global_order()
    assert global_order == ranks[1].global_order()
    assert list(ranks[1]) == global_order[1::2]


def test_set_epoch_changes_the_order_and_seed_fixes_it():
    a = ad.LengthGroupedSampler(LENGTHS, 8, seed=1)
    first = list(a)
    assert list(ad.LengthGroupedSampler(LENGTHS, 8, seed=1)) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)


def test_grouped_batches_are_far_more_uniform_than_random(tokenizer, sample, cache):
    lengths = list(ad.tokenize_records(sample[1][:800], tokenizer, Prompter(), 512, False, cache)["length"])
    grouped = batches(ad.LengthGroupedSampler(lengths, 8, seed=0), 8)
    shuffled = batches(torch.utils.data.DistributedSampler(range(len(lengths)), 1, 0, seed=0), 8)
    grouped_fraction = real_token_fraction(lengths, grouped)
    random_fraction = real_token_fraction(lengths, shuffled)
    assert grouped_fraction > 0.9 and random_fraction < 0.7, (grouped_fraction, random_fraction)
    # The longest example is in the first batch, so an out-of-memory error shows at step 1.
    assert max(lengths) in [lengths[i] for i in grouped[0]]
    # Batches that are full keep their size; only the last can be short.
    assert all(len(b) == 8 for b in grouped[:-1]) and math.ceil(len(lengths) / 8) == len(grouped)


@pytest.mark.slow  # the benchmark end to end
# --- the benchmark still runs ----------------------------------------------------------------------------------------

def test_bench_data_runs_and_writes_its_table(tmp_path, capsys, monkeypatch):
    """bench/bench_data.py end to end on the sample once (the real run repeats it 26 times): grouping by length
    wastes less padding than random batches, the cached re-run is faster, the command is on top.

    Positive controls: the random-batch figure is recomputed from the tokenized lengths alone, and the "from cache"
    row is a cache load (the second call tokenizes nothing), so neither row can pass without measuring."""
    from bench import bench_data

    tokenized, datasets_returned = [], []
    tokenize_to_cache, tokenize_records = ad._tokenize_to_cache, ad.tokenize_records
    monkeypatch.setattr(ad, "_tokenize_to_cache", lambda *a, **k: tokenized.append(a[6]) or tokenize_to_cache(*a, **k))
    monkeypatch.setattr(ad, "tokenize_records",
                        lambda *a, **k: datasets_returned.append(tokenize_records(*a, **k)) or datasets_returned[-1])
    out = tmp_path / "data.md"
    bench_data.main(["--repeat", "1", "--epochs", "1", "--max-length", "128", "--out", str(out)])
    # Three tokenize_records calls (the sample, the cold and the warm timing); only the first two tokenized.
    assert len(datasets_returned) == 3 and len(tokenized) == 2 and tokenized[1].parent.name == "big"
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    assert "Reproduce: `python bench/bench_data.py --repeat 1 --epochs 1 --max-length 128 --out " in table
    value = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[1] for row in table.splitlines() if row.count("|") == 4}
    random_fraction = float(value["real-token fraction, random batches (DistributedSampler)"])
    grouped_fraction = float(value["real-token fraction, LengthGroupedSampler"])
    assert 0 < random_fraction < grouped_fraction <= 1
    lengths = list(datasets_returned[0]["length"])
    order = list(torch.utils.data.DistributedSampler(range(len(lengths)), num_replicas=1, rank=0, seed=0))
    batches = [[lengths[i] for i in order[start:start + 8]] for start in range(0, len(order), 8)]  # batch size 8
    assert abs(random_fraction - sum(lengths) / sum(len(b) * max(b) for b in batches)) < 5e-4
    cold = next(float(v.split()[0]) for k, v in value.items() if k.startswith("tokenize "))
    warm = float(value["same call again, loaded from cache, wall"].split()[0])
    assert warm < cold
