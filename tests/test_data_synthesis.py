"""AVAR synthesis end to end against a real HTTP server on 127.0.0.1 (tests/fake_chat_server.py).

Checks: complete and correct training JSONL; retries on 429 / 500 / timeout / malformed JSON; every rejection
names its gate; a SIGKILL in the middle of stage (b) plus a rerun reproduces an uninterrupted run's files
byte for byte, with no second request for anything that was already cached (the server's hit log is counted);
a damaged middle line of a stage file is quarantined and rebuilt from the cache without a request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_mod.cli import main
from attn_mod.config import ConfigError, load_config
from attn_mod.data.samples import read_samples
from attn_mod.data.synthesis import SynthesisConfig, parse_rewrites, run_synthesis
from attn_mod.eval.scoring import score
from tests.helpers import random_image

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "fake_chat_server.py"

# item -> (question, answer, answer_type, options)
ITEMS = {
    "q1": ("Which shape is red?", "A", "choice", {"A": "square", "B": "circle"}),
    "q2": ("How many shapes are there?", "2", "number", None),
    "q3": ("Is the square left of the circle?", "yes", "yesno", None),
    "q4": ("What colour is the circle?", "blue", "text", None),
    "q5": ("How many sides does the square have?", "4", "number", None),
    "q6": ("Which shape is blue?", "B", "choice", {"A": "square", "B": "circle"}),
    "q7": ("Is there a triangle?", "no", "yesno", None),
    "q8": ("What is written under the shapes?", "Q8", "text", None),
    "q9": ("How many circles are there?", "1", "number", None),
    "q10": ("What colour is the square?", "red", "text", None),
}
FAULTS = {  # retried transient faults: each item still succeeds
    "q1": {"vision-m": ["429", "500"]},
    "q2": {"reason-m": ["timeout"]},
    "q3": {"rewrite-m": ["malformed", "503"]},
}
GATES = {  # answers that fail a gate -> rejected with that reason
    "q4": ({"reason-m": "wrong_answer"}, "answer_mismatch"),
    "q5": ({"reason-m": "no_anchor"}, "no_anchor"),
    "q6": ({"rewrite-m": "keep_placeholder"}, "placeholder_not_rewritten"),
    "q7": ({"rewrite-m": "missing_line"}, "placeholder_not_rewritten"),
    "q8": ({"reason-m": "long"}, "reasoning_too_long"),
}


def write_source(d: Path) -> Path:
    (d / "imgs").mkdir(parents=True)
    with (d / "source.jsonl").open("w") as f:
        for k, (name, (q, a, t, opts)) in enumerate(ITEMS.items()):
            random_image(40 + 8 * k, 36 + 4 * k, seed=k).save(d / "imgs" / f"{name}.png")
            row = {"index": name, "question": f"{q} (item {name})", "answer": a, "answer_type": t,
                   "image": f"imgs/{name}.png"}
            if opts:
                row["options"] = opts
            f.write(json.dumps(row) + "\n")
    return d / "source.jsonl"


class Server:
    def __init__(self, d: Path, delay: dict | None = None, faults: dict | None = None):
        d.mkdir(parents=True, exist_ok=True)
        items = {}
        faults = FAULTS if faults is None else faults
        for name, (_, a, _, _) in ITEMS.items():
            items[name] = {"answer": a, "faults": faults.get(name, {}), "gate": GATES.get(name, ({}, None))[0]}
        (d / "control.json").write_text(json.dumps({"items": items, "delay": delay or {}, "timeout_sleep": 2.5}))
        self.hits = d / "hits.jsonl"
        port_file = d / "port"
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--control", str(d / "control.json"),
                                      "--hits", str(self.hits), "--port-file", str(port_file),
                                      "--lifetime", "240", "--idle", "90"])
        for _ in range(200):
            if port_file.exists():
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("fake chat server did not start")
        self.url = f"http://127.0.0.1:{port_file.read_text()}/v1"

    def hit_rows(self) -> list[dict]:
        return [json.loads(line) for line in self.hits.read_text().splitlines() if line.strip()]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server")
    yield s
    s.stop()


def config(tmp_path: Path, source: Path, url: str, out: str, **endpoint) -> Path:
    cfg = {
        "source": {"path": str(source), "instructions": "cot"},
        "output_dir": str(tmp_path / out),
        "endpoint": {"base_url": url, "api_key": "test", "timeout_s": 1.0, "max_retries": 4, "backoff_s": 0.01,
                     "backoff_max_s": 0.05, "concurrency": 2, **endpoint},
        "describe": {"model": "vision-m", "temperature": 0.0},
        "reason": {"model": "reason-m", "temperature": 0.6, "max_tokens": 512},
        "anchor": {"model": "rewrite-m"},
        "gates": {"max_reasoning_chars": 4000},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FINAL_FILES = ("train.jsonl", "rejected.jsonl", "report.json", "describe.jsonl", "reason.jsonl", "anchor.jsonl")


def test_synthesis_end_to_end(tmp_path, server):
    source = write_source(tmp_path / "src")
    cfg = load_config(SynthesisConfig, config(tmp_path, source, server.url, "out"))
    result = run_synthesis(cfg, progress=False)
    out = Path(cfg.output_dir)

    # accepted: every item without a gate failure, each a valid training sample whose target scores correct
    want_ok = [n for n in ITEMS if n not in GATES]
    train = read_samples(out / "train.jsonl", require_assistant=True)
    assert [s.id for s in train] == want_ok
    for s in train:
        q, a, t, opts = ITEMS[s.id]
        assert s.answer == a and s.answer_type == t and s.options == (opts or {})
        assert s.has_system and s.messages[1]["content"][0] == {"type": "image"}
        assert f"(item {s.id})" in s.messages[1]["content"][1]["text"]
        assert s.load_images()[0].size == (40 + 8 * list(ITEMS).index(s.id), 36 + 4 * list(ITEMS).index(s.id))
        target = s.target_text()
        assert "<anchor" not in target.lower() and "[ANCHOR" not in target
        assert target.count("Looking back at the image of") == 2  # both placeholders rewritten in place
        assert score(s, target).correct and target.rstrip().endswith(f"\\boxed{{{a}}}")
        prov = s.meta["provenance"]
        assert prov["describe"]["model"] == "vision-m" and prov["anchor"]["model"] == "rewrite-m"
        assert len(prov["reason"]["prompt_sha256"]) == 64 and prov["n_anchors"] == 2
        assert s.meta["source"]["index"] == s.id

    # every rejection names its gate
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rejected} == {n: reason for n, (_, reason) in GATES.items()}
    assert all(r["detail"] for r in rejected)
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == len(want_ok) and report["pending"] == 0
    assert report["rejections_by_reason"] == dict(Counter(reason for _, reason in GATES.values()))

    # retries happened: the faulted requests were sent again until they succeeded
    hits = server.hit_rows()
    by = Counter((h["model"], h["item"]) for h in hits)
    assert by[("vision-m", "q1")] == 3 and by[("reason-m", "q2")] == 2 and by[("rewrite-m", "q3")] == 3
    assert result.run_stats["retries"] == 5 and result.run_stats["errors"] == {"transient": 5}
    assert all(n == 1 for k, n in by.items() if k not in {("vision-m", "q1"), ("reason-m", "q2"), ("rewrite-m", "q3")})
    # a rerun pays nothing: everything is done or cached
    n_hits = len(hits)
    again = run_synthesis(cfg, progress=False)
    assert len(server.hit_rows()) == n_hits and again.run_stats["requests"] == 0
    assert again.report == result.report

    # a changed prompt is refused in the same output_dir (the stage rows were made with the old one) ...
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for f in ("describe", "reason", "anchor"):
        (prompts / f"{f}.txt").write_text((ROOT / "configs" / "prompts" / "avar" / f"{f}.txt").read_text())
    (prompts / "anchor.txt").write_text((prompts / "anchor.txt").read_text() + "\nBe brief.\n")
    changed = dataclasses.replace(cfg, prompts_dir=str(prompts))
    with pytest.raises(ValueError, match="different stages"):
        run_synthesis(changed, progress=False)
    # ... and in a new output_dir sharing the cache only the changed stage is requested again
    shared = dataclasses.replace(changed, output_dir=str(tmp_path / "out2"), cache_path=str(out / "cache.jsonl"))
    third = run_synthesis(shared, progress=False)
    new_hits = server.hit_rows()[n_hits:]
    assert {h["model"] for h in new_hits} == {"rewrite-m"} and third.run_stats["cache_hits"] > 0


def test_kill_during_reason_and_rerun_matches(tmp_path, capsys):
    source = write_source(tmp_path / "src")
    ref_server = Server(tmp_path / "ref_server")
    try:
        ref_cfg = load_config(SynthesisConfig, config(tmp_path, source, ref_server.url, "ref"))
        run_synthesis(ref_cfg, progress=False)
    finally:
        ref_server.stop()

    server = Server(tmp_path / "kill_server", delay={"reason-m": 0.4})
    try:
        cfg_path = config(tmp_path, source, server.url, "run")
        out = tmp_path / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "attn_mod", "data", "synthesize", str(cfg_path),
                                 "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reason_log = out / "reason.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if reason_log.exists() and len(reason_log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"synthesis ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        n_reason = len(reason_log.read_text().splitlines())
        assert 3 <= n_reason < len(ITEMS), "the kill must land in the middle of stage (b)"
        assert not (out / "anchor.jsonl").exists() and not (out / "train.jsonl").exists()
        cached = {json.loads(x)["id"] for x in (out / "cache.jsonl").read_text().splitlines() if x.strip()}
        hits_before = len(server.hit_rows())

        cfg = load_config(SynthesisConfig, cfg_path)
        assert main(["data", "synthesize", str(cfg_path), "--no-progress"]) == 0  # the rerun, through the CLI
        printed = capsys.readouterr().out
        assert "| accepted (train.jsonl) | 5 |" in printed and "| rejected: placeholder_not_rewritten | 2 |" in printed
        for name in FINAL_FILES:
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

        hits = server.hit_rows()
        after = hits[hits_before:]
        assert not [h for h in after if h["model"] == "vision-m"], "stage (a) was complete: nothing to resend"
        ok = [h for h in hits if h["status"] == 200 and h["fault"] is None]
        resent_cached = [h for h in after if h["sha"] in cached]
        assert not resent_cached, f"cached requests sent again: {resent_cached}"
        dup = Counter(h["sha"] for h in ok)
        # only requests in flight at the kill (answered, never cached) may have been answered twice
        assert sum(n - 1 for n in dup.values()) <= 2 * cfg.endpoint.concurrency

        # a damaged middle line: quarantined, the row rebuilt from the cache, no request, same final files
        lines = (out / "reason.jsonl").read_text().splitlines(keepends=True)
        lines[2] = '{"id": "q3", "status": "ok", "te\n'
        (out / "reason.jsonl").write_text("".join(lines))
        n_hits = len(server.hit_rows())
        with pytest.warns(UserWarning, match="quarantined 1 bad line"):
            again = run_synthesis(cfg, progress=False)
        assert len(server.hit_rows()) == n_hits and again.run_stats["cache_hits"] >= 1
        assert again.run_stats["quarantined_lines"] == {"reason": 1}
        assert (out / "reason.jsonl.quarantine.jsonl").exists()
        for name in ("train.jsonl", "rejected.jsonl", "report.json"):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    finally:
        server.stop()


def test_config_errors_name_the_fix(tmp_path):
    source = write_source(tmp_path / "src")
    path = config(tmp_path, source, "http://127.0.0.1:9/v1", "bad")
    data = yaml.safe_load(path.read_text())
    data["gates"]["min_anchors"] = 0
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="min_anchors"):
        load_config(SynthesisConfig, path)
    data["gates"]["min_anchors"] = 1
    data["endpoint"]["concurency"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="concurency: unknown key"):
        load_config(SynthesisConfig, path)
    del data["endpoint"]["concurency"]
    data["reason"]["model"] = None
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(SynthesisConfig, path)
    with pytest.raises(ValueError, match="reason.model"):
        run_synthesis(cfg, progress=False)
    assert not (tmp_path / "bad").exists()  # nothing written before the config is known to be usable


def test_parse_rewrites():
    assert parse_rewrites("1: Look back: red.\n2) Checking again, 6.", 2) == ({1: "Look back: red.", 2: "Checking again, 6."}, "")
    assert parse_rewrites("1: a", 2)[0] is None
    assert "twice" in parse_rewrites("1: a\n1: b", 1)[1]
    assert "still contain" in parse_rewrites("1: <anchor> x", 1)[1]
    assert "do not exist" in parse_rewrites("1: a\n3: c", 1)[1]


def test_tsv_source_with_embedded_images(tmp_path, server):
    import base64
    import io

    d = tmp_path / "tsv"
    d.mkdir()
    lines = ["index\timage\tquestion\tanswer\tanswer_type"]
    sizes = {}
    for k, name in enumerate(("q9", "q10")):
        buf = io.BytesIO()
        im = random_image(30 + 10 * k, 40, seed=20 + k)
        im.save(buf, format="PNG")
        sizes[name] = im.size
        q, a, t, _ = ITEMS[name]
        lines.append(f"{name}\t{base64.b64encode(buf.getvalue()).decode()}\t{q} (item {name})\t{a}\t{t}")
    (d / "src.tsv").write_text("\n".join(lines) + "\n")
    cfg = load_config(SynthesisConfig, config(tmp_path, d / "src.tsv", server.url, "tsv_out"))
    result = run_synthesis(cfg, progress=False)
    assert result.report["accepted"] == 2
    train = read_samples(Path(cfg.output_dir) / "train.jsonl", require_assistant=True)
    for s in train:
        assert s.images == (f"images/{s.id}_0.png",) and s.load_images()[0].size == sizes[s.id]


def test_example_configs_load():
    from attn_mod.data.difficulty import FilterConfig
    from attn_mod.data.synthesis import load_prompts

    cfg = load_config(SynthesisConfig, ROOT / "configs" / "data" / "avar_synthesis.yaml")
    prompts = load_prompts(cfg)
    assert set(prompts) == {"describe", "reason", "anchor"} and all(p.system and p.user for p in prompts.values())
    assert "<anchor" in prompts["reason"].user and "{{" not in prompts["reason"].render(
        question="q", description="d", answer_hint="h")[1]
    assert cfg.assembly.answer_format.format(reasoning="R", answer="7").endswith("\\boxed{7}")
    load_config(FilterConfig, ROOT / "configs" / "data" / "difficulty_filter.yaml")


def test_http_400_rejects_the_item_and_401_stops_the_run(tmp_path):
    from attn_mod.data.chat_client import EndpointError

    source = write_source(tmp_path / "src")
    server = Server(tmp_path / "server", faults={"q1": {"vision-m": ["400"]}, "q2": {"reason-m": ["401"]}})
    try:
        cfg = load_config(SynthesisConfig, config(tmp_path, source, server.url, "out"))
        with pytest.raises(EndpointError, match="check base_url, api key"):
            run_synthesis(cfg, progress=False)
        described = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "out" / "describe.jsonl").read_text().splitlines()}
        assert described["q1"]["reason"] == "request_rejected" and "HTTP 400" in described["q1"]["detail"]
        assert all(r["status"] == "ok" for k, r in described.items() if k != "q1") and len(described) == len(ITEMS)
        hits = Counter((h["model"], h["item"]) for h in server.hit_rows())
        assert hits[("vision-m", "q1")] == 1 and hits[("reason-m", "q2")] == 1  # neither is retried
    finally:
        server.stop()


_words = st.text(alphabet="abcdefgh XYZ,.019", min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_words, st.one_of(st.none(), _words)), min_size=1, max_size=6), _words)
def test_placeholder_round_trip(pieces, tail):
    from attn_mod.data.synthesis import fill_anchors, find_placeholders, number_placeholders

    text = "".join(p + ("<anchor>" if h is None else f"<anchor: {h}>") for p, h in pieces) + tail
    hints = find_placeholders(text)
    assert len(hints) == len(pieces)
    assert hints == [("" if h is None else h.strip()) for _, h in pieces]
    numbered = number_placeholders(text)
    assert [int(k) for k in re.findall(r"\[ANCHOR (\d+)", numbered)] == list(range(1, len(pieces) + 1))
    answer = "\n".join(f"{k}: look back {k}." for k in range(1, len(pieces) + 1))
    rewrites, why = parse_rewrites(answer, len(pieces))
    assert why == "" and rewrites == {k: f"look back {k}." for k in range(1, len(pieces) + 1)}
    filled = fill_anchors(text, rewrites)
    assert filled == "".join(p + f"look back {k}." for k, (p, _) in enumerate(pieces, 1)) + tail


def test_endpoint_and_models_from_the_environment(monkeypatch):
    from attn_mod.data.chat_client import EndpointConfig
    from attn_mod.data.synthesis import StageConfig

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"endpoint.base_url in the config or \$OPENAI_BASE_URL"):
        EndpointConfig().resolved()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8123/v1/")
    assert EndpointConfig().resolved() == ("http://127.0.0.1:8123/v1", "EMPTY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert EndpointConfig().resolved("http://127.0.0.1:9/v1") == ("http://127.0.0.1:9/v1", "sk-test")
    assert EndpointConfig(base_url="https://a/v1", api_key="k").resolved() == ("https://a/v1", "k")
    with pytest.raises(ValueError, match="http:// or https://"):
        EndpointConfig(base_url="127.0.0.1:8000").resolved()
    monkeypatch.setenv("AVAR_REASON_MODEL", "Qwen3-235B")
    assert SynthesisConfig().reason.resolved_model("reason") == "Qwen3-235B"
    with pytest.raises(ValueError, match=r"set describe.model in the config or \$AVAR_DESCRIBE_MODEL"):
        monkeypatch.delenv("AVAR_DESCRIBE_MODEL", raising=False)
        SynthesisConfig().describe.resolved_model("describe")
    assert StageConfig(model="m", temperature=0.0, extra_body={"top_k": 20}).params() == {
        "temperature": 0.0, "extra_body": {"top_k": 20}}
