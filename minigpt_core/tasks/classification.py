"""Sequence classification (the book's chapter 6): labelled texts, a new Linear(emb_dim, n_classes) head.

A batch row is ``[token ids padded to max_length | number of real tokens | class index]``. The
examples are read from a CSV/TSV/JSONL file or a Hugging Face dataset, optionally undersampled to
balance the classes, shuffled with ``split_seed`` and cut into train/validation/test (70/10/20 by
default), as the book does for the SMS Spam Collection.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base.reading import DATA_LIMIT, read_text_bounded, require_regular_file
from ..data.sources import DataError
from ..model.trainable import mark_trainable
from ..spec import ClassificationSpec, ExperimentSpec
from .base import FinalReport
from .supervised import SPLITS, ExampleData, ExampleSplit, SupervisedTask, base_tokenizer, json_records, over_rows

__all__ = ["ClassificationTask", "ClassificationData", "read_examples", "split_examples", "check_split_sizes",
           "pack_rows", "pool", "confusion_matrix", "classification_metrics", "majority_baseline",
           "encode_for_classification"]

HEAD_ATTR = "_minigpt_classes"  # on a model whose out_head is a classification head: its classes
FIELD_LIMIT = 8 * 2**20  # characters in one CSV/TSV field: far beyond any context length, bounded all the same


# -- reading ------------------------------------------------------------------------------------
def _file_format(cs: ClassificationSpec, path: Path) -> str:
    if cs.format != "auto":
        return cs.format
    ext = path.suffix.lower()
    known = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
    if ext not in known:
        raise DataError(f"classification.path {str(path)!r}: cannot tell the format from the extension "
                        f"{ext or '(none)'}; set classification.format to csv, tsv or jsonl.")
    return known[ext]


def _column_index(column: str | int, header: list[str] | None, which: str, where: str) -> int:
    if header is None:
        if isinstance(column, str):
            raise DataError(f"classification.{which}_column = {column!r}, but {where} is read without a header "
                            f"(classification.header = false), so its columns have no names: give the 0-based "
                            f"column number instead, e.g. {which}_column = {0 if which == 'label' else 1}.")
        return column
    if isinstance(column, int):
        if 0 <= column < len(header):
            return column
    elif column in header:
        return header.index(column)
    raise DataError(f"classification.{which}_column = {column!r} is not a column of {where}: its header has "
                    f"{header}. Name one of these (or a 0-based number), or set classification.header = false "
                    f"if the first row is data.")


def _read_data(path: Path) -> str:
    return read_text_bounded(path, "classification data file", DATA_LIMIT, DataError, hint=_DATA_HINT,
                             newline="")


_DATA_HINT = "Set classification.path to a CSV, TSV or JSONL file of labelled texts (docs/finetune.md)."


def _read_table(cs: ClassificationSpec, path: Path, delimiter: str) -> list[tuple[str, str]]:
    # TSV as the book reads the SMS Spam Collection: one example per line, quotes are text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    kind = "TSV" if delimiter == "\t" else "CSV"
    # The csv module's default limit (131,072 characters a field) refuses ordinary long documents; the
    # limit is process-wide, so it is raised for this read only.
    previous = csv.field_size_limit(FIELD_LIMIT)
    try:
        with io.StringIO(_read_data(path), newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            rows, start = [], 1  # start: the line the row being read begins on
            try:
                for r in reader:
                    if r:
                        rows.append(r)
                    start = reader.line_num + 1
            except csv.Error as exc:
                hint = (f" A field may hold at most {FIELD_LIMIT:,} characters: is a quote left open, so that "
                        f"the rest of the file reads as one field?" if "field limit" in str(exc) else "")
                raise DataError(f"{path}, line {start}: cannot be read as {kind} ({exc}).{hint} Fix that line, "
                                f"or check classification.format.") from None
    finally:
        csv.field_size_limit(previous)
    if not rows:
        return []
    header = None
    if cs.header:
        header, rows = rows[0], rows[1:]
    where = str(path)
    ti = _column_index(cs.text_column, header, "text", where)
    li = _column_index(cs.label_column, header, "label", where)
    out = []
    for n, row in enumerate(rows, 2 if header else 1):
        if max(ti, li) >= len(row):
            raise DataError(f"{path}, row {n}: has {len(row)} column(s), but classification.text_column / "
                            f"label_column need column {max(ti, li)} (0-based). Check the delimiter "
                            f"(classification.format) and the column settings.")
        out.append((row[ti], row[li].strip()))
    return out


def _read_jsonl(cs: ClassificationSpec, path: Path) -> list[dict[str, Any]]:
    records = json_records(_read_data(path), path)
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: every record must be a JSON object with the text and label fields.")
    return records


def _from_records(cs: ClassificationSpec, records: list[dict[str, Any]], where: str,
                  label_names: list[str] | None = None) -> list[tuple[str, str]]:
    out = []
    for n, r in enumerate(records, 1):
        for which, column in (("text", cs.text_column), ("label", cs.label_column)):
            if column not in r:
                raise DataError(f"classification.{which}_column = {column!r} is not a field of {where} (record "
                                f"{n} has {sorted(r)}). Name one of these fields.")
        label = r[cs.label_column]
        if label_names is not None and isinstance(label, int) and 0 <= label < len(label_names):
            label = label_names[label]  # a Hugging Face ClassLabel
        out.append((str(r[cs.text_column]), str(label).strip()))
    return out


def _read_hf(cs: ClassificationSpec) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise DataError("classification.hf_dataset needs the `datasets` package: pip install datasets") from None
    local = Path(cs.hf_dataset).expanduser()
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(local))  # written by save_to_disk, which load_dataset refuses
            if isinstance(ds, datasets.DatasetDict):
                if cs.hf_split not in ds:
                    raise DataError(f"classification.hf_split = {cs.hf_split!r} is not a split of the dataset "
                                    f"{cs.hf_dataset!r}: it has {sorted(ds)}.")
                ds = ds[cs.hf_split]
        else:
            ds = datasets.load_dataset(cs.hf_dataset, split=cs.hf_split)
    except DataError:
        raise
    except Exception as exc:  # offline, unknown name, bad split: datasets raises many kinds
        raise DataError(f"classification.hf_dataset = {cs.hf_dataset!r} (split {cs.hf_split!r}) could not be "
                        f"loaded: {type(exc).__name__}: {exc}. Use a local dataset directory or a file "
                        f"(classification.path).") from None
    feature = ds.features.get(cs.label_column) if isinstance(cs.label_column, str) else None
    names = list(feature.names) if hasattr(feature, "names") else None
    return _from_records(cs, list(ds), f"the dataset {cs.hf_dataset!r}", names)


def read_examples(cs: ClassificationSpec) -> list[tuple[str, str]]:
    """(text, label) pairs in file order; a clear DataError for a missing, empty or misdescribed source."""
    if cs.hf_dataset is not None:
        examples = _read_hf(cs)
        where = f"the dataset {cs.hf_dataset!r}"
    else:
        path = Path(cs.path).expanduser()
        if path.exists():  # a device or FIFO is named as such, before its (missing) extension is
            require_regular_file(path, "classification data file", DataError, _DATA_HINT)
        else:
            raise DataError(f"classification.path {cs.path!r}: no such file (relative paths are resolved from "
                            f"{Path.cwd()}).")
        fmt = _file_format(cs, path)
        try:
            if fmt == "jsonl":
                examples = _from_records(cs, _read_jsonl(cs, path), str(path))
            else:
                examples = _read_table(cs, path, "," if fmt == "csv" else "\t")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
        where = str(path)
    if not examples:
        raise DataError(f"{where} holds no examples; a classification task needs labelled texts "
                        f"(docs/finetune.md shows the formats).")
    return examples


# -- classes, balance, split -------------------------------------------------------------------
def resolve_classes(cs: ClassificationSpec, labels: list[str], where: str) -> list[str]:
    seen = sorted(set(labels))
    if cs.classes is None:
        if len(seen) < 2:
            raise DataError(f"{where} has only one label ({seen[0]!r}); a classifier needs at least two classes.")
        return seen
    outside = [l for l in seen if l not in cs.classes]
    if outside and cs._classes_from is not None:
        n = sum(l in outside for l in labels)
        raise DataError(f"{where} has {n} example(s) labelled {outside[:10]}, outside the classes {cs.classes} of "
                        f"the init_from classifier {cs._classes_from}: its head has one output per class. Fix the "
                        f"labels or classification.label_column, or start from the language model it was "
                        f"fine-tuned from to train a new head for these classes.")
    if outside:
        n = sum(l in outside for l in labels)
        raise DataError(f"{where} has {n} example(s) labelled {outside[:10]}, outside the declared "
                        f"classification.classes {cs.classes}. Add them to classes, fix the labels, or check "
                        f"classification.label_column.")
    return list(cs.classes)


def split_examples(labels: np.ndarray, n_classes: int, cs: ClassificationSpec) -> dict[str, np.ndarray]:
    """Example indices of each split: undersampled (optionally), shuffled with split_seed, cut by fraction."""
    rng = np.random.default_rng(cs.split_seed)
    keep = np.arange(len(labels))
    if cs.balance == "undersample":
        present = [np.flatnonzero(labels == c) for c in range(n_classes)]
        least = min(len(p) for p in present if len(p))
        keep = np.sort(np.concatenate([rng.choice(p, least, replace=False) for p in present if len(p)]))
    order = keep[rng.permutation(len(keep))]
    n_train = int(len(order) * cs.split[0])
    n_val = int(len(order) * cs.split[1])
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def check_split_sizes(parts: dict[str, np.ndarray], cs: ClassificationSpec, where: str) -> None:
    """Refuse, before any run directory exists, a split with no training or validation examples (an
    empty validation split would only show later, as a NaN loss and a "diverged" run), or none for the
    test split classification.split asks for (a tiny test fraction: the test split takes the rest)."""
    sizes = {s: len(parts[s]) for s in SPLITS}
    empty = [name for s, name in zip(SPLITS, ("training", "validation", "test"))
             if not sizes[s] and (s != "test" or cs.split[2] > 0)]
    if not empty:
        return
    total = sum(sizes.values())
    undersampled = " (after undersampling to balance the classes)" if cs.balance == "undersample" else ""
    smallest = (f": of {total:,} examples, a fraction of at least {1 / total:.3g} (1/{total:,}) holds one"
                if total else "")
    no_test = " (or set the test fraction to 0 for no test split)" if "test" in empty else ""
    raise DataError(f"{where}: the split {list(cs.split)} of its {total:,} example(s){undersampled} leaves "
                    f"{sizes['train']:,} training / {sizes['val']:,} validation / {sizes['test']:,} test examples: "
                    f"no {' and no '.join(empty)} examples. Add examples, or change classification.split"
                    f"{smallest}{no_test}.")


def pack_rows(ids: list[list[int]], labels: np.ndarray, max_length: int, pad_id: int) -> np.ndarray:
    """(N, max_length + 2): ids truncated/padded to max_length, then the real length, then the label."""
    rows = np.full((len(ids), max_length + 2), pad_id, dtype=np.int64)
    for i, seq in enumerate(ids):
        seq = seq[:max_length]
        rows[i, :len(seq)] = seq
        rows[i, -2] = len(seq)
    rows[:, -1] = labels
    return rows


def pool(logits: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) per-position outputs -> (B, C): the last position (the book's) or the mean over real tokens."""
    if how == "last":
        return logits[:, -1, :]
    mask = torch.arange(logits.shape[1], device=logits.device)[None, :] < lengths.clamp(min=1)[:, None]
    mask = mask.to(logits.dtype).unsqueeze(-1)
    return (logits * mask).sum(1) / mask.sum(1)


# -- metrics ------------------------------------------------------------------------------------
def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: the true class, columns: the predicted one."""
    return np.bincount(np.asarray(true) * n_classes + np.asarray(pred),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(cm: np.ndarray, classes: list[str], split: str) -> dict[str, float]:
    """Accuracy and per-class precision / recall (0 where a class is never predicted / present)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    out = {f"{split}/accuracy": float(np.trace(cm) / total) if total else math.nan}
    for c, name in enumerate(classes):
        predicted, actual = cm[:, c].sum(), cm[c, :].sum()
        out[f"{split}/precision/{name}"] = float(cm[c, c] / predicted) if predicted else 0.0
        out[f"{split}/recall/{name}"] = float(cm[c, c] / actual) if actual else 0.0
    return out


def majority_baseline(train_labels: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[int, float]:
    """The training split's most frequent class and the accuracy of always predicting it on ``labels``."""
    majority = int(np.bincount(train_labels, minlength=n_classes).argmax())
    return majority, float(np.mean(labels == majority)) if len(labels) else math.nan


# -- the task -------------------------------------------------------------------------------------
@dataclass
class ClassificationSplit(ExampleSplit):
    classes: list[str]
    pad_id: int
    pooling: str

    def describe(self) -> str:
        return (f"{len(self.train):,} train / {len(self.val):,} validation / {len(self.test):,} test examples, "
                f"{len(self.classes)} classes {self.classes}, {self.length - 1} tokens each (padded with id "
                f"{self.pad_id}), {self.pooling}-token pooling")


@dataclass
class ClassificationData(ExampleData):
    split: ClassificationSplit  # length: max_length + 1 (the trainer trains on length - 1 tokens)
    extra: dict[str, Any] = field(default_factory=dict)


def encode_for_classification(tokenizer, texts: list[str], max_length: int, pad_id: int) -> np.ndarray:
    """Rows as training packs them (label column 0): what ``minigpt classify`` feeds the model."""
    return pack_rows([tokenizer.encode(t) for t in texts], np.zeros(len(texts), dtype=np.int64), max_length, pad_id)


class ClassificationTask(SupervisedTask):
    name = "classification"
    per_token_loss = False

    def __init__(self, spec: ExperimentSpec):
        super().__init__(spec)
        self.data: ClassificationData | None = None
        self.last_confusion: dict[str, np.ndarray] = {}  # split -> its confusion matrix at the last evaluation

    @property
    def cs(self) -> ClassificationSpec:
        return self.spec.classification

    def load_data(self, spec, *, tokenizer_state=None, write: Callable[[str], None] = print, env=None,
                  progress: bool = False) -> ClassificationData:
        self.spec = spec
        cs = self.cs
        examples = read_examples(cs)
        where = cs.path or f"the dataset {cs.hf_dataset!r}"
        texts = [t for t, _ in examples]
        classes = resolve_classes(cs, [l for _, l in examples], where)
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[l] for _, l in examples], dtype=np.int64)
        parts = split_examples(labels, len(classes), cs)
        check_split_sizes(parts, cs, where)
        tokenizer = base_tokenizer(spec, tokenizer_state, texts)
        ids = [tokenizer.encode(t) for t in texts]
        context = spec.model.context_length
        max_length = cs.max_length or min(max(len(ids[i]) for i in parts["train"]), context)
        if max_length > context:
            raise DataError(f"classification.max_length ({max_length}) exceeds model.context_length ({context}): "
                            f"the model cannot read longer examples; lower classification.max_length.")
        pad_id = cs.pad_id if cs.pad_id is not None else (tokenizer.eot_id if tokenizer.eot_id is not None else 0)
        if pad_id >= spec.model.vocab_size:
            raise DataError(f"the padding id {pad_id} is outside the model's vocabulary ({spec.model.vocab_size} "
                            f"ids); set classification.pad_id.")
        # What the run must keep to rebuild its head and read new texts the same way (spec.toml).
        if cs.classes != classes:
            cs.classes = classes
        if cs.max_length != max_length:
            cs.max_length = max_length
        rows = {s: pack_rows([ids[i] for i in parts[s]], labels[parts[s]], max_length, pad_id) for s in SPLITS}
        split = ClassificationSplit(rows["train"], rows["val"], rows["test"], max_length + 1, classes, pad_id,
                                    cs.pooling)
        counts = np.bincount(labels, minlength=len(classes))
        source = (f"{where}: {len(examples):,} examples ("
                  + ", ".join(f"{c} {n:,}" for c, n in zip(classes, counts)) + ")"
                  + (", undersampled to balance the classes" if cs.balance == "undersample" else ""))
        self.data = ClassificationData(tokenizer, split, source)
        return self.data

    def attach_head(self, model: nn.Module) -> nn.Module:
        classes = self.cs.classes
        if not classes:
            raise DataError("The classification head needs its classes; they are read from the data "
                            "(or classification.classes) before the model is built.")
        have = model.__dict__.get(HEAD_ATTR)
        if have is not None:  # init_from a classifier: its trained head goes on training
            if have != list(classes):
                raise DataError(f"The model already has a classification head for the classes {have}, not "
                                f"{list(classes)}; start from the language model it was fine-tuned from.")
            return model
        # Seeded apart from the training RNG, so every process and every rebuild makes the same head.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            head = nn.Linear(model.spec.emb_dim, len(classes))
        # A new head always trains, whatever [finetune] freezes (it starts random).
        model.out_head = mark_trainable(head.to(model.tok_emb.weight.device))
        model.__dict__[HEAD_ATTR] = list(classes)
        return model

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :-2]

    def pooled(self, logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return pool(logits, batch[:, -2], self.cs.pooling).float()

    def loss(self, logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.pooled(logits, batch), batch[:, -1])

    def baseline_loss(self) -> float:
        counts = np.bincount(self.data.split.train[:, -1], minlength=len(self.data.split.classes))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def predict(self, model: nn.Module, rows: np.ndarray, *, micro_batch: int, device: torch.device,
                precision: str = "fp32", env=None, progress=None) -> tuple[float, np.ndarray]:
        """(summed loss, confusion matrix) over ``rows``, split evenly over processes (summed back)."""
        k = len(self.data.split.classes) if self.data else len(self.cs.classes)
        total = torch.zeros((), dtype=torch.float64, device=device)
        cm = torch.zeros(k * k, dtype=torch.float64, device=device)

        def consume(logits: torch.Tensor, batch: torch.Tensor) -> None:
            nonlocal total, cm
            pooled = self.pooled(logits, batch)
            total += F.cross_entropy(pooled, batch[:, -1], reduction="sum").double()
            cm += torch.bincount(batch[:, -1] * k + pooled.argmax(-1), minlength=k * k).double()

        env = over_rows(model, rows, self.inputs, consume, micro_batch=micro_batch, device=device,
                        precision=precision, env=env, progress=progress)
        return float(env.sum(total)), env.sum(cm).cpu().numpy().reshape(k, k).astype(np.int64)

    def evaluate(self, model: nn.Module, split: str, **options: Any) -> tuple[float, dict[str, float]]:
        rows = self.data.split.rows(split)
        loss_sum, cm = self.predict(model, rows, **options)
        metrics = classification_metrics(cm, self.data.split.classes, split)
        self.last_confusion[split] = cm
        return (loss_sum / len(rows) if len(rows) else math.nan), metrics

    def split_result(self, model: nn.Module, split: str, rows: np.ndarray,
                     **options: Any) -> tuple[dict[str, float], dict[str, Any]]:
        sp = self.data.split
        loss, m = self.evaluate(model, split, **options)
        majority, base = majority_baseline(sp.train[:, -1], rows[:, -1], len(sp.classes))
        record = {"examples": len(rows), "loss": loss, "majority_class": sp.classes[majority],
                  "majority_baseline": base, "confusion_matrix": self.last_confusion[split].tolist(), **m}
        return {**m, f"{split}/loss": loss, f"{split}/majority_baseline": base}, record

    def final_report(self, metrics: dict[str, float], results: dict[str, dict[str, Any]]) -> FinalReport:
        report = {"classes": self.data.split.classes, **results}
        return FinalReport({k: v for k, v in metrics.items() if not k.startswith("val/loss")}, report,
                           format_report(report))


def format_report(report: dict[str, Any]) -> str:
    classes = report["classes"]
    lines = ["classification results (majority baseline: always the training split's most frequent class)",
             f"  {'split':<6} {'examples':>8} {'accuracy':>9} {'baseline':>9} {'loss':>8}"]
    for split in SPLITS:
        r = report.get(split)
        if r:
            lines.append(f"  {split:<6} {r['examples']:>8,} {r[f'{split}/accuracy']:>9.2%} "
                         f"{r['majority_baseline']:>9.2%} {r['loss']:>8.4f}")
    last = "test" if "test" in report else "val"
    r = report[last]
    width = max(8, *(len(c) for c in classes))
    lines.append(f"  per class ({last}): {'precision':>9} {'recall':>7}")
    for c in classes:
        lines.append(f"    {c:<{width}} {r[f'{last}/precision/{c}']:>9.2%} {r[f'{last}/recall/{c}']:>7.2%}")
    lines.append(f"  confusion matrix ({last}; rows: true class, columns: predicted, in the order above)")
    for c, row in zip(classes, r["confusion_matrix"]):
        lines.append(f"    {c:<{width}} " + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
