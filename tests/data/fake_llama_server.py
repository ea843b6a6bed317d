"""A stand-in for llama-server's HTTP surface used by scripts/llama_server_bench.py (/health, /apply-template,
/completion), so the bench's orchestration is tested without llama.cpp. Answers are a function of the prompt;
the mode named by $FAKE_DIVERGE (a --spec-type) changes the last token, as a lossy speculator would, and the one
named by $FAKE_FAIL_START exits at start as a server that cannot load its model; each
request is appended to $FAKE_LOG as "PORT SPEC_TYPE PROMPT"."""

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int)
ap.add_argument("--spec-type", default="none")
ap.add_argument("-md")
opts, _ = ap.parse_known_args()
if opts.spec_type == os.environ.get("FAKE_FAIL_START"):
    print("llama_model_load: error loading model: tensor 'fc.weight' not found", flush=True)
    sys.exit(1)


def answer(prompt: str, n: int) -> dict:
    tokens = [(ord(c) * 7) % 1000 for c in (prompt * n)[:n]]
    if opts.spec_type == os.environ.get("FAKE_DIVERGE"):
        tokens[-1] += 1
    timings = {"predicted_n": n, "predicted_ms": 10.0 * n if opts.spec_type == "none" else 5.0 * n,
               "predicted_per_second": 0.0, "prompt_n": len(prompt), "prompt_ms": 1.0}
    if opts.spec_type != "none":  # the server reports draft counts only when it drafted
        timings.update(draft_n=2 * n, draft_n_accepted=n)
    return {"content": "x", "tokens": tokens, "timings": timings, "stop_type": "limit"}


class Handler(BaseHTTPRequestHandler):
    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/apply-template":
            self._send({"prompt": "<user>" + body["messages"][0]["content"] + "<assistant>"})
            return
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(f"{opts.port} {opts.spec_type} {body['prompt']}\n")
        self._send(answer(body["prompt"], body["n_predict"]))

    def log_message(self, *a):
        pass


HTTPServer(("127.0.0.1", opts.port), Handler).serve_forever()
