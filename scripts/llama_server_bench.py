"""llama-server alone, with its n-gram speculation modes and with our EAGLE-3 draft, on the same prompts,
model file and threads, in one run: tokens/s, the server's draft acceptance, and whether each answer equals
llama-server alone's token for token.

    cd <repo> && PYTHONPATH=$PWD nice -n 10 /work/main/.venv/bin/python scripts/llama_server_bench.py \\
      --server /work/runs/llama/server-build/bin/llama-server --model default \\
      --draft eagle3-draft.gguf --prompts heldout24.jsonl --threads 1,2 --out lserver.json
    (--modes picks the modes, default none,ngram-simple,ngram-map-k,ngram-mod,draft-eagle3; --from lserver.json
    reprints the table of an earlier run without a server)

How: for each thread count, one llama-server per mode is started (its own free port, -np 1, -t/-td THREADS,
the same --model file; the eagle3 mode adds -md DRAFT --spec-type draft-eagle3), all kept up together so the
modes interleave per prompt: prompt i goes to the modes in an order rotated by i. The chat template is applied
once per prompt by the alone server (/apply-template), and that same prompt text goes to every mode's
/completion with temperature 0, top_k 1, a fixed seed, cache_prompt off and return_tokens on. tok/s is the
server's own (predicted_n / predicted_ms over all prompts) and the client's wall (tokens / request seconds,
prompt processing included); acceptance is draft_n_accepted / draft_n from the server's timings. An idle server
sleeps while another mode runs; each server answers one short warm-up request before the timed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

ALONE = "none"  # llama-server's own name for no speculation (--spec-type none)
NGRAM_MODES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
EAGLE3 = "draft-eagle3"
DEFAULT_MODES = f"{ALONE},ngram-simple,ngram-map-k,ngram-mod,{EAGLE3}"


def _error(msg: str) -> Exception:
    from ctc_drafter.errors import CTCDrafterError

    return CTCDrafterError(msg)


class Mode(NamedTuple):
    name: str
    args: list  # what this mode adds to the shared server command line


def parse_modes(spec: str, draft: str | None, draft_n_max: int | None) -> list[Mode]:
    """The modes named in `spec` (comma-separated), alone first: every other mode is compared with it."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in (ALONE, EAGLE3, *NGRAM_MODES)]
    if unknown:
        raise _error(f"unknown mode {unknown[0]!r} (use {ALONE}, {EAGLE3} or one of {', '.join(NGRAM_MODES)})")
    if len(set(names)) != len(names):
        raise _error(f"--modes names a mode twice: {spec}")
    if EAGLE3 in names and not draft:
        raise _error(f"mode {EAGLE3} needs --draft (our export converted with convert_hf_to_gguf.py)")
    names = [ALONE] + [n for n in names if n != ALONE]  # the reference runs even when not named
    n_max = ["--spec-draft-n-max", str(draft_n_max)] if draft_n_max is not None else []
    modes = []
    for n in names:
        if n == ALONE:
            modes.append(Mode(n, []))
        elif n == EAGLE3:
            modes.append(Mode(n, ["-md", str(draft), "--spec-type", EAGLE3, *n_max]))
        else:
            modes.append(Mode(n, ["--spec-type", n, *n_max]))
    return modes


def parse_threads(spec: str) -> list[int]:
    try:
        threads = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise _error(f"--threads takes comma-separated integers, got {spec!r}") from None
    if not threads or min(threads) < 1:
        raise _error(f"--threads needs counts >= 1, got {spec!r}")
    return threads


def read_prompts(path: str, limit: int | None) -> list[tuple[str, str]]:
    """(question_id, first user turn) of an MT-bench-style question file (`turns`), as `eval` reads it."""
    from ctc_drafter.evaluation.questions import load_questions

    qs = load_questions(path, "mt_bench")
    return [(str(q.question_id), q.turns[0]) for q in qs[:limit] if q.turns]


# ---- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(binary: str, model: str, mode: Mode, threads: int, port: int, ctx: int, extra: list) -> list:
    return [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-td", str(threads), "-np", "1", "-c", str(ctx), "--seed", "0", "--no-webui", *mode.args, *extra]


def _http(port: int, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _ask(port: int, path: str, body: dict) -> dict:
    """A request to a running server; a refusal or a dead server is one clear line, not a traceback."""
    try:
        return _http(port, path, body)
    except urllib.error.HTTPError as e:
        raise _error(f"llama-server {path} answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        raise _error(f"llama-server on port {port} stopped answering {path}: {e}") from None


class Server:
    """One llama-server process for one mode; its log goes to a file (the last line explains a failed start)."""

    def __init__(self, cmd: list, port: int, log: Path):
        self.cmd, self.port, self.log = cmd, port, log
        self._log_f = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_f, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
                raise _error(f"llama-server exited ({self.proc.returncode}) at start: {' '.join(tail)} "
                             f"(log {self.log}; command {' '.join(self.cmd)})")
            try:
                if _http(self.port, "/health", timeout=5).get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise _error(f"llama-server did not answer /health within {timeout:.0f} s (log {self.log})")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_f.close()


def chat_prompt(port: int, user: str) -> str:
    """The model's own chat template applied by the server (the GGUF's tokenizer.chat_template)."""
    return _ask(port, "/apply-template", {"messages": [{"role": "user", "content": user}]})["prompt"]


def complete(port: int, prompt: str, n_predict: int, seed: int) -> dict:
    """One greedy completion: the generated token ids, the server's timings and the request's wall seconds."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "seed": seed,
            "cache_prompt": False, "return_tokens": True, "stream": False}
    t0 = time.perf_counter()
    r = _ask(port, "/completion", body)
    wall = time.perf_counter() - t0
    return {"tokens": r.get("tokens", []), "timings": r.get("timings", {}), "wall_s": wall,
            "stop_type": r.get("stop_type")}


def run_threads(args, modes: list[Mode], prompts: list, threads: int, log_dir: Path) -> list[dict]:
    """All modes' servers up together; prompt i goes to the modes in an order rotated by i."""
    servers = {}
    try:
        for m in modes:
            port = free_port()
            cmd = server_command(args.server, args.model, m, threads, port, args.ctx, args.server_arg)
            servers[m.name] = Server(cmd, port, log_dir / f"server-t{threads}-{m.name}.log")
            servers[m.name].wait_ready()  # one at a time: starts (model load, warm-up) do not overlap
        alone = servers[ALONE].port
        for s in servers.values():
            complete(s.port, chat_prompt(alone, "Hello"), 8, args.seed)
        rows = []
        for i, (qid, user) in enumerate(prompts):
            prompt = chat_prompt(alone, user)
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for m in order:
                r = complete(servers[m.name].port, prompt, args.n_predict, args.seed)
                rows.append({"threads": threads, "question_id": qid, "mode": m.name, **r})
            print(f"t{threads} {i + 1}/{len(prompts)} {qid}", file=sys.stderr, flush=True)
        return rows
    finally:
        for s in servers.values():
            s.stop()


# ---- the report


def summarize(rows: list[dict]) -> list[dict]:
    """Per (threads, mode): server and wall tok/s over all prompts, acceptance, answers equal to alone's."""
    alone = {(r["threads"], r["question_id"]): r["tokens"] for r in rows if r["mode"] == ALONE}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["threads"], r["mode"]), []).append(r)
    out = []
    for (threads, mode), rs in groups.items():
        n_tok = sum(r["timings"].get("predicted_n", 0) for r in rs)
        ms = sum(r["timings"].get("predicted_ms", 0.0) for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        drafted = sum(r["timings"].get("draft_n", 0) for r in rs)
        accepted = sum(r["timings"].get("draft_n_accepted", 0) for r in rs)
        same = sum(1 for r in rs if alone.get((threads, r["question_id"])) == r["tokens"])
        out.append({"threads": threads, "mode": mode, "prompts": len(rs), "tokens": n_tok,
                    "server_tok_s": n_tok / ms * 1000 if ms else 0.0, "wall_tok_s": n_tok / wall if wall else 0.0,
                    "draft_n": drafted, "draft_n_accepted": accepted,
                    "acceptance": accepted / drafted if drafted else None, "identical": same})
    for s in out:  # speed-ups against alone at the same thread count
        ref = next((a for a in out if a["threads"] == s["threads"] and a["mode"] == ALONE), None)
        s["speedup"] = s["server_tok_s"] / ref["server_tok_s"] if ref and ref["server_tok_s"] else None
    return sorted(out, key=lambda s: (s["threads"], s["mode"] != ALONE))


def table(summary: list[dict]) -> str:
    lines = ["| threads | mode | tok/s (server) | tok/s (wall) | × alone | drafted | accepted | acceptance "
             "| identical to alone |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        acc = "–" if s["acceptance"] is None else f"{s['acceptance']:.1%}"
        up = "–" if s["speedup"] is None else f"{s['speedup']:.2f}×"
        lines.append(f"| {s['threads']} | {s['mode']} | {s['server_tok_s']:.1f} | {s['wall_tok_s']:.1f} | {up} "
                     f"| {s['draft_n']} | {s['draft_n_accepted']} | {acc} | {s['identical']}/{s['prompts']} |")
    return "\n".join(lines)


def _check_inputs(args):
    if not args.server or not (Path(args.server).is_file() and os.access(args.server, os.X_OK)):
        raise _error(f"llama-server binary not found or not executable: {args.server} (build it from the "
                     "vendored llama.cpp: cmake --build BUILD --target llama-server)")
    for what, p in (("model", args.model), ("draft", args.draft), ("prompt file", args.prompts)):
        if p and not Path(p).is_file():
            raise _error(f"{what} not found: {p}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=os.environ.get("LLAMA_SERVER", "llama-server"),
                    help="the llama-server binary (or $LLAMA_SERVER)")
    ap.add_argument("--model", default="default", help="the base GGUF; 'default' = the embedded base's Q4_1 GGUF")
    ap.add_argument("--draft", help="our EAGLE-3 draft as GGUF (convert_hf_to_gguf.py --target-model-dir)")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--draft-n-max", type=int, help="--spec-draft-n-max for every speculative mode "
                    "(default: the server's)")
    ap.add_argument("--prompts", help="question file (MT-bench style jsonl)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--server-arg", action="append", default=[], help="extra llama-server argument (repeatable), "
                    "e.g. --server-arg=--no-repack")
    ap.add_argument("--out", help="write every answer's tokens and timings and the summary here (JSON)")
    ap.add_argument("--from", dest="from_json", help="reprint the table of an earlier --out file")
    args = ap.parse_args(argv)

    if args.from_json:
        try:
            rows = json.loads(Path(args.from_json).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _error(f"--from {args.from_json}: not a bench file ({e})") from None
        print(table(summarize(rows)))
        return
    modes = parse_modes(args.modes, args.draft, args.draft_n_max)
    threads = parse_threads(args.threads)
    if not args.prompts:
        raise _error("--prompts is required (held-out prompts, MT-bench style jsonl)")
    if args.model == "default":
        from ctc_drafter.evaluation.llamacpp_engine import gguf_for

        args.model = str(gguf_for("default"))
    _check_inputs(args)
    prompts = read_prompts(args.prompts, args.limit)
    log_dir = Path(args.out).with_suffix(".logs") if args.out else Path(os.environ.get("TMPDIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in threads:
        rows += run_threads(args, modes, prompts, t, log_dir)
    summary = summarize(rows)
    if args.out:
        meta = {"server": args.server, "model": args.model, "draft": args.draft, "modes": [m._asdict() for m in modes],
                "n_predict": args.n_predict, "seed": args.seed, "prompts": args.prompts}
        Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    print(table(summary))


if __name__ == "__main__":
    from ctc_drafter.errors import CTCDrafterError

    try:
        main()
    except CTCDrafterError as e:
        sys.exit(f"error: {e}")
