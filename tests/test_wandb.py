"""Weights & Biases: a real offline run, read back from its run-*.wandb file."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from minigpt_core import MinigptError, parse_spec
from minigpt_core.train import train
from training_utils import cli, losses, read_metrics, runs_of, tiny_spec_data, wait_for, write_spec

_BLOCK, _HEADER = 32768, 7  # the LevelDB log layout W&B uses for run-*.wandb
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every Record protobuf of an offline run file, checking each chunk's CRC32."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad CRC at {pos}"
        pos += _HEADER + length
        if kind in (_FIRST, _MIDDLE):
            pending = (pending if kind == _MIDDLE else b"") + chunk
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk if kind == _LAST else chunk)
        pending = b""
        yield record


def finished_records(path: Path) -> list:
    """The run file's records once W&B has written all of them (its `exit` record comes last):
    wandb-core may still be writing the file when `finish()` returns, on a loaded machine."""
    def whole():
        try:
            records = list(wandb_records(path))
        except Exception:  # noqa: BLE001 - a chunk still being written (bad CRC, short protobuf)
            return None
        return records if any(r.WhichOneof("record_type") == "exit" for r in records) else None

    return wait_for(f"W&B to finish writing {path}", whole)


def history(path: Path) -> list[dict]:
    rows = []
    for r in finished_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in r.history.item})
    return rows


@pytest.mark.slow
def test_offline_run_holds_config_metrics_and_samples(tmp_path):
    spec = parse_spec(tiny_spec_data(
        tmp_path, train={"max_steps": 6, "eval_every": 3, "sample_every": 3, "sample_tokens": 12},
        wandb={"mode": "offline", "project": "minigpt-tests", "group": "ablation-1", "job_type": "unit-test",
               "tags": ["ci"]}))
    result = train(spec, progress=False, write=lambda s: None)
    assert result.wandb_mode == "offline" and result.wandb_dir.name.startswith("offline-run-")
    (run_file,) = result.wandb_dir.glob("run-*.wandb")

    records = finished_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_group, run.job_type) == \
        ("minigpt-tests", "tiny-test", "ablation-1", "unit-test")
    assert list(run.tags) == ["ci"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["emb_dim"] == 32 and config["tokenizer"]["name"] == "char"
    assert config["train"]["max_steps"] == 6
    assert {"book", "data", "tokenizers"} <= set(config["plugins"])
    assert config["plugins"]["book"].startswith("minigpt ")

    rows = history(run_file)
    logged = {r["_step"]: r for r in rows}
    jsonl = losses(result.run_dir)
    assert sorted(s for s, r in logged.items() if "train/loss" in r) == sorted(jsonl) == list(range(1, 7))
    for step, loss in jsonl.items():
        assert logged[step]["train/loss"] == loss  # the same float, not a rounded copy
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/peak_memory_mb"):
        assert logged[6][key] > 0, key
    assert logged[3]["val/loss"] == losses(result.run_dir, "val/loss")[3]
    assert logged[0]["data/unigram_entropy"] == pytest.approx(result.unigram_entropy)

    # the samples table: a wandb.Table file with every sample so far
    table_rows = [r for r in rows if r.get("samples/_type") == "table-file"]
    assert len(table_rows) == 2
    table = json.loads((result.wandb_dir / "files" / table_rows[-1]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "text"] and [row[0] for row in table["data"]] == [3, 6]
    samples = [r["sample/text"] for r in read_metrics(result.run_dir) if "sample/text" in r]
    assert [row[2] for row in table["data"]] == samples


def test_wandb_mode_env_overrides_the_spec(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path, train={"max_steps": 2, "eval_every": 0, "save_every": 0}, wandb={"mode": "offline"})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    status, out, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 0, err
    (run,) = runs_of(tmp_path / "runs")
    assert not (run / "wandb").exists() and "W&B" not in out
    assert sorted(losses(run)) == [1, 2]  # the JSONL log is written regardless
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    status, _, err = cli(capsys, "train", spec, "--no-progress")
    assert status == 2 and "WANDB_MODE='sometimes'" in err


def test_wandb_section_rejects_unknown_fields():
    with pytest.raises(MinigptError, match="wandb.projekt"):
        parse_spec({"wandb": {"projekt": "x"}})
