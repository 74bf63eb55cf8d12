"""A deterministic OpenAI-compatible `/v1/chat/completions` stand-in for the synthesis tests (stdlib only).

    python tests/fake_chat_server.py --control control.json --hits hits.jsonl --port-file port.txt

Binds 127.0.0.1 on a free port (written to --port-file), stops itself after --lifetime seconds or --idle seconds
without a request. Every request is appended (flushed) to --hits as {"model", "item", "sha", "status", "attempt"},
sha being the SHA-256 of the request body.

The item of a request is the ``(item NAME)`` tag of its question. The stage is read from the model name
("vision" -> describe, "reason" -> reason, "rewrite" -> anchor). control.json:

    {"items": {"q1": {"answer": "B",
                      "faults": {"reason-m": ["429", "500", "timeout", "malformed"]},  # attempt n gets faults[n]
                      "gate": {"reason-m": "wrong_answer" | "no_anchor" | "long",
                               "rewrite-m": "keep_placeholder" | "missing_line"}}},
     "delay": {"reason-m": 0.2},          # seconds before each answer of that model
     "timeout_sleep": 3.0}                # how long a "timeout" fault stalls
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def stage_of(model: str) -> str:
    return "describe" if "vision" in model else "reason" if "reason" in model else "anchor"


def answer_text(stage: str, item: str, spec: dict, gate: str | None, req: dict) -> str:
    if stage == "describe":
        return (f"The image for {item} shows a red square to the left of a blue circle; "
                f"a label under them reads {item.upper()}.")
    if stage == "reason":
        answer = str(spec.get("answer", "A"))
        if gate == "wrong_answer":
            answer = "Z" if not re.fullmatch(r"[-\d.]+", answer) else str(float(answer) + 17)
        a1 = "" if gate == "no_anchor" else "<anchor: the colour of the square> "
        a2 = "" if gate == "no_anchor" else "<anchor>"
        pad = " Let me re-check this once more." * 400 if gate == "long" else ""
        return (f"First, {a1}the square is red and sits left of the circle.\n"
                f"Wait, I should verify the label. {a2} It reads {item.upper()}, so my reading holds.{pad}\n"
                f"Final answer: \\boxed{{{answer}}}")
    user = req["messages"][-1]["content"]
    n = len(set(re.findall(r"\[ANCHOR (\d+)", user)))
    lines = [f"{k}: Looking back at the image of {item}, fact {k} is confirmed." for k in range(1, n + 1)]
    if gate == "keep_placeholder" and lines:
        lines[-1] = f"{n}: <anchor> look again"
    if gate == "missing_line" and lines:
        lines = lines[:-1]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--control", required=True)
    ap.add_argument("--hits", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--lifetime", type=float, default=300.0)
    ap.add_argument("--idle", type=float, default=60.0)
    args = ap.parse_args()
    control = json.load(open(args.control))
    attempts: Counter = Counter()
    lock = threading.Lock()
    last = [time.time()]
    hits = open(args.hits, "a")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self):
            last[0] = time.time()
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self.path.endswith("/chat/completions"):
                return self._send(404, b'{"error": {"message": "not found"}}')
            req = json.loads(raw)
            model = req["model"]
            text = json.dumps(req["messages"])
            m = re.search(r"\(item (\w+)\)", text)
            item = m.group(1) if m else "?"
            spec = control["items"].get(item, {})
            with lock:
                attempt = attempts[(model, item)]
                attempts[(model, item)] += 1
            faults = spec.get("faults", {}).get(model, [])
            fault = faults[attempt] if attempt < len(faults) else None
            stage = stage_of(model)
            status = 200 if fault in (None, "malformed", "timeout") else int(fault)
            if stage == "describe" and fault is None and "data:image/png;base64," not in text:
                status, fault = 400, "no_image"
            rec = {"model": model, "item": item, "sha": hashlib.sha256(raw).hexdigest(), "attempt": attempt,
                   "status": status, "fault": fault}
            with lock:
                hits.write(json.dumps(rec) + "\n")
                hits.flush()
            time.sleep(float(control.get("delay", {}).get(model, 0.0)))
            if fault == "timeout":
                time.sleep(float(control.get("timeout_sleep", 3.0)))
            if fault == "malformed":
                return self._send(200, b'{"id": "x", "choices": [ {"message": ')
            if fault == "no_image":
                return self._send(400, b'{"error": {"message": "describe needs an image"}}')
            if status != 200:
                return self._send(status, json.dumps({"error": {"message": f"fault {fault}"}}).encode(),
                                  {"Retry-After": "0"} if status == 429 else None)
            content = answer_text(stage, item, spec, spec.get("gate", {}).get(model), req)
            body = {"id": f"cmpl-{item}-{attempt}", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            return self._send(200, json.dumps(body).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    start = time.time()

    def watchdog():
        while True:
            time.sleep(0.2)
            now = time.time()
            if now - start > args.lifetime or now - last[0] > args.idle:
                server.shutdown()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os

    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever(poll_interval=0.1)
    hits.close()


if __name__ == "__main__":
    main()
