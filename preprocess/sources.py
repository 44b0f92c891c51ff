"""Source rows: a split of Geo3K from a local parquet/JSONL file or the Hugging Face Hub.

A source is read whole into a pyarrow table (Geo3K is ~3k rows); rows are handed to workers by shard range.
Its file hash goes into the fingerprint, so an edited source is noticed on the next run. polars is not used:
pyarrow reads parquet and slices rows for the workers already, and a second dataframe library would only add
an import (~0.3 s) to every worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from preprocess.images import Reject
from shared.config import SourceConfig
from shared.errors import UserError
from shared.manifest import sha256_file


class SourceError(UserError, RuntimeError):
    pass


@dataclass
class Source:
    split: str
    path: Path  # the file read (downloaded into the hub cache for hub sources)
    origin: str  # what the user named: a path or hf://repo/file
    sha256: str
    table: pa.Table
    image_root: Path | None = None

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def base_dir(self) -> Path:
        """Relative image paths are read from source.image_root, else from the source file's folder."""
        return self.image_root or self.path.parent

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        return self.table.slice(start, stop - start).to_pylist()


def _read_jsonl(path: Path) -> pa.Table:
    """One row per non-blank line, kept as the line's raw bytes: a line that is not UTF-8, not JSON or not an
    object is that row's reject (decided in the worker, `row_fields`), never the end of the run."""
    if path.suffix == ".json":  # one JSON document: a list of row objects
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{path} is not a readable JSON file ({e}): write it as UTF-8 JSON, or one row per line as .jsonl") from None
        if not isinstance(rows, list):
            rows = [rows]
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
        numbers = list(range(1, len(lines) + 1))
    else:
        lines, numbers = [], []
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    lines.append(line.rstrip(b"\r\n"))
                    numbers.append(n)
    return pa.table({"__line__": pa.array(lines, pa.binary()), "__lineno__": pa.array(numbers, pa.int64())})


def _hub_file(repo: str, split: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=f"{split}.parquet", repo_type="dataset"))
    except Exception as e:  # offline, unknown repo, missing file: all end the same way for the user
        raise SourceError(
            f"cannot fetch {split}.parquet from the Hugging Face dataset {repo} ({e.__class__.__name__}). "
            f"Offline? Point source.files.{split} at a local parquet/JSONL file, or make demo data with "
            "`geo3k demo-data` and use its pipeline.yaml"
        ) from None


def open_source(cfg: SourceConfig, split: str, config_dir: Path | None = None) -> Source:
    if split in cfg.files:
        path = Path(cfg.files[split])
        if not path.is_absolute() and config_dir is not None and not path.exists():
            path = config_dir / path
        if not path.exists():
            raise SourceError(f"source.files.{split}: {path} does not exist")
        origin = str(cfg.files[split])
    else:
        assert cfg.hf_repo
        path = _hub_file(cfg.hf_repo, split)
        origin = f"hf://datasets/{cfg.hf_repo}/{split}.parquet"
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceError(f"{path} is not a readable parquet file: {e}") from None
        missing = [k for k in (cfg.input_key, cfg.label_key, cfg.image_key) if k not in table.column_names]
        if missing:
            raise SourceError(
                f"{path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                f"set source.input_key / label_key / image_key"
            )
    else:
        table = _read_jsonl(path)
    if cfg.max_rows is not None:
        table = table.slice(0, cfg.max_rows)
    image_root = Path(cfg.image_root) if cfg.image_root else None
    if image_root is not None and not image_root.is_absolute() and config_dir is not None:
        image_root = config_dir / image_root
    return Source(split, path, origin, sha256_file(path), table, image_root)


def _parse_line(row: dict[str, Any]) -> dict[str, Any]:
    line, n = row["__line__"], row["__lineno__"]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("bad-row", f"line {n} is not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1}): save the file as UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Reject("bad-row", f"line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise Reject("bad-row", f"line {n} is a JSON {type(value).__name__}, not an object of fields")
    return value


def row_fields(row: dict[str, Any], cfg: SourceConfig) -> tuple[Any, Any, list[Any]]:
    """(problem, answer, image entries) of a row; JSONL rows arrive as their raw line. Raises Reject."""
    if "__line__" in row:
        row = _parse_line(row)
    images = row.get(cfg.image_key)
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]
    return row.get(cfg.input_key), row.get(cfg.label_key), images
