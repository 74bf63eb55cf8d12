"""Append-only JSONL (attn_mod.jsonl) and the sweep's ResultStore: a damaged line never costs a valid row."""

import json
import warnings

import pytest

from attn_mod.eval.results import ResultStore
from attn_mod.jsonl import append_jsonl, quarantine_path, read_jsonl


def rows(n):
    return [{"cell": f"c{i % 3}", "dataset": "d", "sample_id": str(i), "correct": i % 2 == 0} for i in range(n)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_corrupt_middle_line_is_quarantined_and_every_valid_row_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    good = rows(36)
    lines = [json.dumps(r, sort_keys=True) for r in good]
    lines[10] = "{this is not json"  # line 11
    write_lines(path, lines)
    with pytest.warns(UserWarning, match=r"quarantined 1 bad line.*line 11: not valid JSON"):
        store = ResultStore(path)
    expected = [r for i, r in enumerate(good) if i != 10]
    assert len(store.done) == 35 and store.load() == expected
    # the valid rows are still in the file, byte for byte, and the bad line is in the side file
    assert path.read_text().splitlines() == [line for i, line in enumerate(lines) if i != 10]
    side = [json.loads(x) for x in quarantine_path(path).read_text().splitlines()]
    assert side == [{"file": "results.jsonl", "line": 11, "reason": side[0]["reason"], "text": "{this is not json"}]
    assert "not valid JSON" in side[0]["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: reopening is silent
        assert len(ResultStore(path).done) == 35


def test_row_missing_keys_is_quarantined_with_a_clear_reason(tmp_path):
    path = tmp_path / "results.jsonl"
    good = rows(5)
    lines = [json.dumps(r) for r in good]
    lines.insert(2, json.dumps({"dataset": "d", "sample_id": "x"}))  # no "cell"
    lines.insert(4, "[1, 2]")
    write_lines(path, lines)
    with pytest.warns(UserWarning, match=r"line 3: missing key\(s\) \['cell'\].*line 5: not a JSON object"):
        store = ResultStore(path)
    assert store.load() == good
    reasons = [json.loads(x)["reason"] for x in quarantine_path(path).read_text().splitlines()]
    assert len(reasons) == 2 and "missing key(s) ['cell']" in reasons[0]


def test_only_a_torn_last_line_is_truncated(tmp_path):
    path = tmp_path / "m.jsonl"
    good = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(4)]
    append_jsonl(path, good)
    with path.open("a") as f:
        f.write('{"step": 4, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(path, required=("step",)) == good
    assert path.read_text().count("\n") == 4 and not quarantine_path(path).exists()
    # a complete but unterminated last row is kept, and the next append does not merge into it
    with path.open("a") as f:
        f.write('{"step": 4, "loss": 0.2}')
    assert read_jsonl(path)[-1] == {"step": 4, "loss": 0.2}
    append_jsonl(path, [{"step": 5, "loss": float("nan")}])
    assert read_jsonl(path)[-2:] == [{"step": 4, "loss": 0.2}, {"step": 5, "loss": None}]


def test_bad_last_line_with_newline_is_not_torn_and_is_quarantined(tmp_path):
    path = tmp_path / "m.jsonl"
    write_lines(path, ['{"a": 1}', '{"a": 2}', "garbage"])
    with pytest.warns(UserWarning, match="line 3"):
        assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert json.loads(quarantine_path(path).read_text())["line"] == 3


def test_read_without_repair_leaves_the_file_untouched(tmp_path):
    path = tmp_path / "m.jsonl"
    write_lines(path, ['{"a": 1}', "nope", '{"a": 3}'])
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="skipping 1 bad line"):
        assert read_jsonl(path, repair=False) == [{"a": 1}, {"a": 3}]
    assert path.read_bytes() == before and not quarantine_path(path).exists()


def test_check_hook_and_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    path = tmp_path / "m.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": -1}, {"a": 2}])
    with pytest.warns(UserWarning, match="line 2: negative"):
        got = read_jsonl(path, check=lambda r: "negative" if r["a"] < 0 else None)
    assert got == [{"a": 1}, {"a": 2}]


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    """Several processes appending to one file (distributed workers) while another reads/repairs it."""
    import subprocess
    import sys

    path = tmp_path / "shared.jsonl"
    script = ("import sys\nfrom attn_mod.jsonl import append_jsonl, read_jsonl\n"
              "w = int(sys.argv[2])\n"
              "for i in range(40):\n"
              "    append_jsonl(sys.argv[1], [{'w': w, 'i': i, 'pad': 'x' * (i * 37 % 3000)}])\n"
              "    if i % 10 == 0:\n        read_jsonl(sys.argv[1], required=('w', 'i'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(w)]) for w in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing torn, nothing quarantined
        got = read_jsonl(path, required=("w", "i"))
    assert sorted((r["w"], r["i"]) for r in got) == [(w, i) for w in range(3) for i in range(40)]
