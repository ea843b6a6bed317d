"""llama-server's own greedy and its n-gram speculation modes on held-out arena prompts (issue 33).

    python scripts/llama_server_bench.py --server PATH/llama-server [--gguf default] [--threads 1]
        [--prompts 8] [--max-new-tokens 128] [--modes none,ngram-simple,ngram-map-k,ngram-mod,ngram-cache]

llama-server is built from the llama.cpp that llama-cpp-python's source distribution vendors (BENCHMARKS.md,
"Per-pass cost of each engine"). Per mode the server starts with `--spec-type MODE` (none: plain greedy)
on the same GGUF and threads; each of the last --prompts questions of ../shared/data/arena/question.jsonl
(never distilled) goes in as token ids (our tokenizer and chat template, as `demo` builds them), greedy,
no prompt cache, one request at a time. Tokens/s counts the client's wall time of the request (prefill
included, as our engines are timed); drafted and accepted counts are the server's. Each mode's texts
are compared with plain greedy's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.request
from pathlib import Path

ARENA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "question.jsonl"
MODES = "none,ngram-simple,ngram-map-k,ngram-mod,ngram-cache"


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start(server: str, gguf: str, mode: str, threads: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [server, "-m", gguf, "-t", str(threads), "-tb", str(threads), "--port", str(port), "-c", "4096",
           "-np", "1", "--spec-type", mode]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited (mode {mode}); see {log}")
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"llama-server did not come up (mode {mode}); see {log}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--gguf", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--modes", default=MODES)
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--out", default="/tmp/llama_server_bench")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from ctc_drafter.evaluation.llamacpp_engine import gguf_for
    from ctc_drafter.models.base import default_model_dir
    from ctc_drafter.models.templates import build_prompt_ids

    gguf = str(gguf_for(a.gguf))
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    questions = [json.loads(x) for x in ARENA.read_text().splitlines() if x.strip()][-a.prompts:]
    prompts = [build_prompt_ids(tok, [{"role": "user", "content": q["turns"][0]}]) for q in questions]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, texts = [], {}
    for mode in a.modes.split(","):
        proc = start(a.server, gguf, mode, a.threads, a.port, out / f"server-{mode}.log")
        try:
            post(a.port, "/completion", {"prompt": prompts[0], "n_predict": 8, "temperature": 0.0})  # warm-up
            n = wall = drafted = accepted = 0
            texts[mode] = []
            for ids in prompts:
                t0 = time.perf_counter()
                r = post(a.port, "/completion", {"prompt": ids, "n_predict": a.max_new_tokens, "temperature": 0.0,
                                                 "top_k": 1, "cache_prompt": False})
                wall += time.perf_counter() - t0
                tm = r.get("timings", {})
                n += tm.get("predicted_n", 0)
                drafted += tm.get("draft_n", 0) or 0
                accepted += tm.get("draft_n_accepted", 0) or 0
                texts[mode].append(r["content"])
        finally:
            proc.terminate()
            proc.wait()
        same = sum(x == y for x, y in zip(texts[mode], texts.get("none", texts[mode])))
        rows.append({"mode": mode, "tokens": n, "wall_s": round(wall, 2), "tok_s": round(n / wall, 2),
                     "drafted": drafted, "accepted": accepted, "same_text_as_greedy": same})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tok_s"] if rows and rows[0]["mode"] == "none" else None
    print(f"\n| llama-server, {Path(gguf).name}, {a.threads} thread(s), {len(prompts)} arena prompts x "
          f"{a.max_new_tokens} tokens | tokens/s | x greedy | drafted | accepted | same text as greedy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        x = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['mode']} | {r['tok_s']:.1f} | {x} | {r['drafted']} | {r['accepted']} | "
              f"{r['same_text_as_greedy']}/{len(prompts)} |")
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
