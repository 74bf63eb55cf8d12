"""JsonlLog (on attn_mod.jsonl): a torn last line is cut, damaged middle lines (bad JSON, no id, duplicate id)
are quarantined, valid rows all stay."""

from __future__ import annotations

import json

import pytest

from attn_mod.data.jsonl_log import JsonlLog


def rows(n):
    return [{"id": f"r{i}", "v": i * 7 + 1} for i in range(n)]


def test_append_and_reload(tmp_path):
    log = JsonlLog(tmp_path / "a.jsonl")
    for r in rows(4):
        log.append(r)
    with pytest.raises(RuntimeError, match="already stored"):
        log.append({"id": "r1", "v": 0})
    with pytest.raises(ValueError, match="non-empty string 'id'"):
        log.append({"v": 1})
    log.append({"id": "t", "v": (1, 2)})
    assert log.get("t") == {"id": "t", "v": [1, 2]}  # kept as a reload reads it
    again = JsonlLog(tmp_path / "a.jsonl")
    assert list(again)[:4] == rows(4) and "r3" in again and again.get("r2")["v"] == 15


def test_torn_last_line_is_truncated(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows(3)) + '{"id": "r3", "v"')
    with pytest.warns(UserWarning, match="torn last line"):
        log = JsonlLog(p)
    assert list(log) == rows(3) and log.truncated and log.quarantined == 0
    log.append({"id": "r3", "v": 22})
    assert [json.loads(x) for x in p.read_text().splitlines()] == rows(4)


def test_complete_last_line_without_newline_is_kept(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows(2)) + json.dumps(rows(3)[2]))
    log = JsonlLog(p)
    assert list(log) == rows(3)
    log.append({"id": "x", "v": 0})
    assert len(p.read_text().splitlines()) == 4


def test_damaged_middle_lines_are_quarantined_not_lost(tmp_path):
    p = tmp_path / "a.jsonl"
    good = rows(6)
    lines = [json.dumps(r) for r in good]
    lines.insert(2, '{"id": "broken", "v": ')  # truncated JSON in the middle
    lines.insert(4, "[1, 2]")  # not an object
    lines.insert(6, json.dumps({"id": "r1", "v": -1}))  # duplicate id
    p.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="quarantined 3 bad line"):
        log = JsonlLog(p)
    assert list(log) == good and log.quarantined == 3
    q = [json.loads(x) for x in log.quarantine_path.read_text().splitlines()]
    assert [r["line"] for r in q] == [3, 5, 7]
    assert "not valid JSON" in q[0]["reason"] and "not a JSON object" in q[1]["reason"] and q[0]["text"] and "duplicate" in q[2]["reason"]
    assert [json.loads(x) for x in p.read_text().splitlines()] == good  # file rewritten with the valid rows only
    assert list(JsonlLog(p)) == good  # and it now opens cleanly
