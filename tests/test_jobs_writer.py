"""The synced result writer and the resume index (torn last lines are cut)."""

import json

import pytest

from batchllm.jobs.writer import CorruptOutput, ResultWriter, recover


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def rec(cid, n, error=False):
    if error:
        return {"id": f"batch_req_{n}", "custom_id": cid, "response": None, "error": {"code": "x", "message": "m"}}
    return {"id": f"batch_req_{n}", "custom_id": cid, "response": {"status_code": 200}, "error": None}


def test_writer_appends_lines_and_syncs_in_batches(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    clock = Clock()
    w = ResultWriter(p, sync_every=3, sync_interval_s=10.0, clock=clock)
    w.write(rec("a", 1))
    w.write(rec("b", 2))
    assert w.syncs == 0 and p.read_bytes() == b""  # still buffered
    w.write(rec("c", 3))
    assert w.syncs == 1 and len(p.read_bytes().splitlines()) == 3
    w.write(rec("d", 4))
    clock.t = 11.0
    w.write(rec("e", 5))  # old enough: synced by time
    assert w.syncs == 2 and len(p.read_bytes().splitlines()) == 5
    w.write(rec("f", 6))
    w.close()
    w.close()
    lines = p.read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == ["a", "b", "c", "d", "e", "f"]
    assert w.syncs == 3 and w.lines_written == 6


def test_writer_appends_to_existing_file(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text(json.dumps(rec("a", 1)) + "\n")
    with ResultWriter(p) as w:
        w.write(rec("b", 2))
    assert [json.loads(x)["custom_id"] for x in p.read_text().splitlines()] == ["a", "b"]


def test_recover_missing_file(tmp_path):
    idx = recover(tmp_path / "none.jsonl")
    assert (idx.custom_ids, idx.error_lines, idx.num_lines, idx.truncated_bytes) == (set(), set(), 0, 0)
    assert not (tmp_path / "none.jsonl").exists()


def test_recover_indexes_ids_and_error_lines(tmp_path):
    p = tmp_path / "o.jsonl"
    lines = [rec("a", 1), rec(None, 2, error=True), rec("c", 3, error=True)]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    idx = recover(p)
    assert (idx.custom_ids, idx.error_lines, idx.num_lines, idx.num_errors, idx.truncated_bytes) == \
        ({"a", "c"}, {2}, 3, 2, 0)


@pytest.mark.parametrize("tail", [b'{"id": "batch_req_9", "custom_id": "z"', b'{"id": "batch_', b"{",
                                  b'{"id": "batch_req_9", "custom_id": "z", "response": null, "error": null}',
                                  b"garbage\n"])
def test_recover_cuts_torn_last_line(tmp_path, tail):
    p = tmp_path / "o.jsonl"
    good = json.dumps(rec("a", 1)) + "\n" + json.dumps(rec("b", 2)) + "\n"
    p.write_bytes(good.encode() + tail)
    idx = recover(p)
    assert idx.custom_ids == {"a", "b"} and idx.num_lines == 2
    assert idx.truncated_bytes == len(tail)
    assert p.read_bytes() == good.encode()


def test_recover_refuses_broken_middle_line(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text(json.dumps(rec("a", 1)) + "\nnot json\n" + json.dumps(rec("b", 2)) + "\n")
    before = p.read_bytes()
    with pytest.raises(CorruptOutput, match="line 2"):
        recover(p)
    assert p.read_bytes() == before
