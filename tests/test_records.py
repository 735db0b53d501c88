"""A run's records on disk (:mod:`esegeta.run.records`): the manifest's order, one record per key,
the same manifest bytes as a list of dicts, and a run's ``RunResult`` reading them back."""
from __future__ import annotations

import json
import math

from esegeta.io import outputs
from esegeta.run.records import Records
from esegeta.run.runner import Pipeline
from helpers_cli import DIGITS, valid_config


def _record(k: int, position: int, status: str = "ok", **extra) -> dict:
    return {"method": f"m{position}", "label": f"m{position}", "input": f"x{k}", "status": status,
            "score": 0.1 * k, "files": {"npy": f"x{k}/m{position}.npy"}, **extra}


def test_records_come_back_in_manifest_order_one_per_key(tmp_path):
    records = Records(3, 2)
    for k, position in [(2, 1), (0, 1), (1, 0), (0, 0), (2, 0)]:  # as threads finish
        records.put((k, position), _record(k, position))
    records.put((0, 1), _record(0, 1, "failed", error="writing results: OSError"))  # replaced, not added
    assert len(records) == 5
    assert [(r["input"], r["method"]) for r in records] == [("x0", "m0"), ("x0", "m1"), ("x1", "m0"),
                                                             ("x2", "m0"), ("x2", "m1")]
    assert records[1]["status"] == "failed" and records[-1]["input"] == "x2" and len(records[1:3]) == 2
    assert records.with_status("ok") == 4 and records.with_status("failed") == 1 and records.with_status("timeout") == 0
    assert [r["input"] for r in records.of_inputs(1)] == ["x0", "x0"]
    assert records == list(records) and records != [] and records is not None


def test_the_manifest_from_records_has_the_bytes_of_one_from_a_list(tmp_path):
    records = Records(2, 1)
    odd = [_record(0, 0, score=float("nan"), warnings=["flat map"]), _record(1, 0, score=1 / 3, shape=(1, 8, 8))]
    for k, record in enumerate(odd):
        records.put((k, 0), record)
    outputs.save_json(tmp_path / "streamed.json", {"esegeta": "x", "runs": records})
    outputs.save_json(tmp_path / "held.json", {"esegeta": "x", "runs": odd})
    assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "held.json").read_bytes()
    runs = json.loads((tmp_path / "streamed.json").read_text())["runs"]
    assert runs[0]["score"] is None and runs[1]["score"] == 1 / 3 and not math.isnan(runs[1]["score"])


def test_a_run_result_reads_its_records_from_disk(tmp_path):
    cfg = valid_config(tmp_path, [{"id": "captum.Saliency"}, {"id": "captum.InputXGradient"}],
                       inputs={"paths": [str(DIGITS)], "spatial_dims": 2})
    result = Pipeline(cfg).run()
    written = json.loads((result.output_dir / "manifest.json").read_text())
    assert isinstance(result.runs, Records) and result.exit_code == 0
    assert list(result.runs) == written["runs"] == result.manifest["runs"]
    assert result.manifest["inputs"] == written["inputs"] and json.dumps(result.manifest)


def test_the_report_reads_the_records_once():
    """The report made a pass over the records per input it draws, and two more (23 passes at 6,000
    inputs, each reading every record back from disk: benchmarks/report_reads.py); now one."""
    from pathlib import Path

    import torch

    from esegeta.io.loading import InputItem
    from esegeta.show import report

    class Counted(Records):
        reads = 0

        def _read(self, flat):
            Counted.reads += 1
            return super()._read(flat)

    items = [InputItem(f"in{k}", Path(f"in{k}.npy"), torch.rand(1, 1, 8, 8)) for k in range(30)]
    records = Counted(len(items), 2)
    for k, item in enumerate(items):
        for position in range(2):
            records.put((k, position), {**_record(k, position, "ok" if k % 7 else "failed"), "input": item.name})
    manifest = {"esegeta": "test", "created": "now", "devices": ["cpu"], "config": {}, "runs": records,
                "inputs": [{"name": item.name} for item in items]}
    html = report.build_report(manifest, items, report.Results(lambda r, item: None), max_inputs=3)
    assert Counted.reads == len(records) == 60
    assert "10 failed, 50 ok" in html and html.count("<section id='input-") == 3
