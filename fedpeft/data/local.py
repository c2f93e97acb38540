"""A user's own dataset: a local CSV/TSV, JSON Lines, Parquet file or a saved Hugging Face ``datasets`` folder.

The file is read with the ``datasets`` library and turned into the same
:class:`TextClassificationData` the bundled datasets give, so partitioning,
tokenisation and training take it through the same code.

Which columns mean what comes from ``[data]`` (:class:`DataColumns`):

- classification: ``text_column`` and ``label_column``. Labels may be strings
  or integers; they are mapped to ``0..K-1`` in sorted order of their values
  (numbers numerically, strings alphabetically), so the same file always gives
  the same ids. A ``datasets.ClassLabel`` column keeps its own ids and names.
- causal LM: ``text_column`` learnt as plain text, or, with a
  ``prompt_template``, instruction tuning: each example is the formatted
  prompt followed by ``response_column``, and the loss counts only the
  response's tokens. ``prompt_template = "alpaca"`` is Stanford Alpaca's
  template on ``instruction``/``input`` columns (the data FlowerTune uses).
- ``client_column`` (optional): the natural client of each row.

A saved ``DatasetDict`` with ``train`` and ``test`` splits keeps them; any
other source is split with a seeded (label-stratified for classification)
``test_fraction`` hold-out.
"""

from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft.data.types import TextClassificationData
from fedpeft.errors import ConfigError

# File suffix -> datasets' packaged builder (and its options).
FILE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca), with and
# without the optional input; FlowerTune's instruction data has these columns.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
CAUSAL_LABEL_NAMES = ("text",)  # a causal LM's rows carry no class: one dummy label


@dataclass(frozen=True)
class DataColumns:
    """How to read a dataset file: the ``[data]`` keys of the same names (``text`` = ``data.text_column``, ...)."""

    text: str = "text"
    label: str = "label"
    client: str = ""
    prompt_template: str = ""
    response: str = "output"


def is_dataset_file(name: str) -> bool:
    """Whether ``data.dataset`` names an existing local file or folder (rather than a bundled dataset)."""
    return Path(name).expanduser().exists()


def looks_like_path(name: str) -> bool:
    """Whether ``data.dataset`` was meant as a path (a folder separator or a dataset-file suffix)."""
    return "/" in name or "\\" in name or Path(name).suffix.lower() in FILE_FORMATS


def load_local_dataset(name: str, *, task: str, columns: DataColumns, seed: int = 0,
                       test_fraction: float = 0.1) -> TextClassificationData:
    """Read the dataset file ``name`` for ``task`` ("classification" or "causal_lm").

    The result is cached per process for the same file contents (size and
    modification time), columns, task and split.

    Raises
    ------
    ConfigError
        For a file that cannot be read, a column that does not exist (naming
        the columns that do), empty labels or too few rows.
    """
    path = Path(name).expanduser().resolve()
    stat = path.stat()
    return _load_cached(name, str(path), stat.st_mtime_ns, stat.st_size, task, columns, int(seed), float(test_fraction))


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, path: str, _mtime: int, _size: int, task: str, columns: DataColumns, seed: int,
                 test_fraction: float) -> TextClassificationData:
    train, test = _read_splits(name, Path(path))
    _check_columns(name, train, task, columns)
    if test is not None:
        _check_columns(name, test, task, columns)
    if task == "classification":
        train_values = train[columns.label]
        test_values = test[columns.label] if test is not None else []
        label_names, codes = _label_codes(name, columns.label, train.features[columns.label],
                                          list(train_values) + list(test_values))
        train_labels, test_labels = codes[: len(train_values)], codes[len(train_values):]
        train_texts, test_texts = _texts(train, columns.text), _texts(test, columns.text) if test is not None else ()
        train_starts = test_starts = ()
    else:
        label_names = CAUSAL_LABEL_NAMES
        train_texts, train_starts = _causal_texts(train, columns)
        test_texts, test_starts = _causal_texts(test, columns) if test is not None else ((), ())
        train_labels, test_labels = np.zeros(len(train_texts), np.int64), np.zeros(len(test_texts), np.int64)
    if columns.client:
        _, train_groups = _codes(name, "data.client_column", columns.client, list(train[columns.client]))
    else:
        train_groups = np.zeros(len(train_texts), np.int64)
    data = TextClassificationData(
        name=name, label_names=tuple(label_names),
        train_texts=tuple(train_texts), train_labels=train_labels, train_groups=train_groups,
        test_texts=tuple(test_texts), test_labels=test_labels,
        train_response_starts=np.asarray(train_starts, np.int64), test_response_starts=np.asarray(test_starts, np.int64),
        group_column=columns.client,
    )
    return data if test is not None else _hold_out(data, task, seed, test_fraction)


def _read_splits(name: str, path: Path):
    """(train, test or None) as ``datasets.Dataset`` objects."""
    import datasets

    # One clear line on error, and no progress bars on the CLI's stderr.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise ConfigError(
                f"data.dataset = {name!r}: the folder is not a saved Hugging Face dataset "
                f"(Dataset.save_to_disk / DatasetDict.save_to_disk): {_first_line(exc)}"
            ) from None
        if isinstance(loaded, datasets.Dataset):
            return loaded, None
        splits = list(loaded)
        if "train" in loaded:
            return loaded["train"], loaded["test"] if "test" in loaded else None
        if len(splits) == 1:
            return loaded[splits[0]], None
        raise ConfigError(f"data.dataset = {name!r}: the DatasetDict needs a 'train' split (and optionally 'test'); "
                          f"it has: {', '.join(splits)}")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ConfigError(f"data.dataset = {name!r}: unknown file type {suffix or '(none)'!r}; use one of: "
                          f"{', '.join(FILE_FORMATS)}, or a saved Hugging Face datasets folder")
    builder, options = FILE_FORMATS[suffix]
    try:
        loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except Exception as exc:  # noqa: BLE001  datasets and pyarrow raise many types for a malformed user file
        raise ConfigError(f"data.dataset = {name!r}: cannot read it as {builder}: {_first_line(exc)}") from None
    return loaded, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _template_fields(name: str, template: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ConfigError(f"data.prompt_template = {template!r} is not a valid format string ({exc}); "
                          "write column names in braces, e.g. \"Q: {question}\\nA: \"") from None


def _check_columns(name: str, split, task: str, columns: DataColumns) -> None:
    """Every column the config names exists; the error names the key, the column and the columns there are."""
    wanted: list[tuple[str, str]] = []  # (what names the column, the column)
    if task == "classification":
        wanted += [(f"data.text_column = {columns.text!r}", columns.text),
                   (f"data.label_column = {columns.label!r}", columns.label)]
    elif columns.prompt_template:
        fields = ["instruction"] if columns.prompt_template == "alpaca" else _template_fields(name, columns.prompt_template)
        for field in fields:
            if not field.isidentifier():
                raise ConfigError(f"data.prompt_template: {{{field}}} must be a plain column name in braces")
            wanted.append((f"data.prompt_template = {columns.prompt_template!r} uses column {field!r}", field))
        wanted.append((f"data.response_column = {columns.response!r}", columns.response))
    else:
        wanted.append((f"data.text_column = {columns.text!r}", columns.text))
    if columns.client:
        wanted.append((f"data.client_column = {columns.client!r}", columns.client))
    have = list(split.column_names)
    for what, column in wanted:
        if column not in have:
            raise ConfigError(f"{what}: no such column in {name}; its columns are: {', '.join(have)}")


def _texts(split, column: str) -> list[str]:
    return ["" if v is None else str(v) for v in split[column]]


def _causal_texts(split, columns: DataColumns) -> tuple[list[str], list[int]]:
    """Each example's text and the character offset where its loss starts (0 = the whole text)."""
    if not columns.prompt_template:
        texts = _texts(split, columns.text)
        return texts, [0] * len(texts)
    texts, starts = [], []
    for row in split:
        values = {k: "" if v is None else str(v) for k, v in row.items()}
        if columns.prompt_template == "alpaca":
            prompt = (ALPACA_WITH_INPUT if values.get("input", "").strip() else ALPACA_NO_INPUT).format_map(values)
        else:
            prompt = columns.prompt_template.format_map(values)
        texts.append(prompt + values[columns.response])
        starts.append(len(prompt))
    return texts, starts


def _sorted_unique(values: list) -> list:
    """Distinct values in a stable order: numerically for numbers, else alphabetically by their text."""
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)


def _codes(name: str, key: str, column: str, values: list) -> tuple[list[str], np.ndarray]:
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise ConfigError(f"{key} = {column!r}: {len(missing)} rows of {name} have no value (first: row {missing[0]})")
    order = _sorted_unique(values)
    index = {v: i for i, v in enumerate(order)}
    return [str(v) for v in order], np.array([index[v] for v in values], dtype=np.int64)


def _label_codes(name: str, column: str, feature, values: list) -> tuple[list[str], np.ndarray]:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), np.asarray(values, dtype=np.int64)
    names, codes = _codes(name, "data.label_column", column, values)
    if len(names) < 2:
        raise ConfigError(f"data.label_column = {column!r}: {name} has a single label ({names[0]!r}); "
                          "classification needs at least two")
    return names, codes


def _hold_out(data: TextClassificationData, task: str, seed: int, test_fraction: float) -> TextClassificationData:
    """Split a single-split dataset into train and test, seeded; stratified by label when every label can be."""
    from sklearn.model_selection import train_test_split

    rows = len(data.train_texts)
    num_test = max(1, math.ceil(rows * test_fraction))
    if rows - num_test < 1:
        raise ConfigError(f"data.dataset = {data.name!r} has {rows} rows; it needs at least 2 (a training and a "
                          f"test row) with data.test_fraction = {test_fraction}")
    labels = data.train_labels
    counts = np.bincount(labels)
    stratify = labels if (task == "classification" and counts[counts > 0].min() >= 2
                          and num_test >= len(data.label_names) and rows - num_test >= len(data.label_names)) else None
    train, test = train_test_split(np.arange(rows), test_size=num_test, random_state=seed, stratify=stratify)
    starts = data.train_response_starts
    return TextClassificationData(
        name=data.name, label_names=data.label_names,
        train_texts=tuple(data.train_texts[i] for i in train), train_labels=labels[train],
        train_groups=data.train_groups[train],
        test_texts=tuple(data.train_texts[i] for i in test), test_labels=labels[test],
        train_response_starts=starts[train] if len(starts) else (),
        test_response_starts=starts[test] if len(starts) else (),
        group_column=data.group_column,
    )
