"""Time requests through running servers, as a client sees them: time to first token and tokens/s.

    python -m ctc_drafter.serving.bench --server speculative=http://127.0.0.1:8000 \\
        --server baseline=http://127.0.0.1:8001 --questions ../shared/data/arena/question.jsonl --last 10

Each prompt goes to every server in turn (alternating which goes first, so that a machine that gets
busier or quieter part-way affects both alike), `--repeats` times; per prompt and server the median
is kept. Requests stream (stream_options.include_usage) through the official `openai` client:
time to first token is from sending the request to the first chunk with text; tokens/s is the
reply's tokens over the whole request time (prefill and HTTP included). Greedy replies of all
servers must be identical (the lossless promise, through HTTP); the table says how many are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ctc_drafter.serving.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", required=True, metavar="NAME=URL",
                   help="a running `ctc-drafter serve` (repeat; the first is the reference of the speedups)")
    p.add_argument("--questions", required=True, help="a jsonl file of {turns: [...]} (MT-bench / arena format)")
    p.add_argument("--last", type=int, default=10, help="use the last N questions' first turns")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write every measurement here")
    return p.parse_args(argv)


def _prompts(path: str, last: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r["turns"][0] for r in records[-last:]]


def _client(url: str):
    import openai

    c = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
    return c, c.models.list().data[0].id


def _one_request(c, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat request, timed on the client."""
    t0 = time.perf_counter()
    first, parts, usage, spec = None, [], None, None
    for chunk in c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        text = "".join(ch.delta.content or "" for ch in chunk.choices)
        if text and first is None:
            first = time.perf_counter() - t0
        parts.append(text)
        usage = chunk.usage or usage
        spec = (chunk.model_extra or {}).get("speculation") or spec
    total = time.perf_counter() - t0
    return {"ttft_s": first if first is not None else total, "total_s": total, "tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens, "tokens_per_s": usage.completion_tokens / total,
            "accept": spec["accepted_tokens_per_step"], "text": "".join(parts)}


def _median_run(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k in ("ttft_s", "total_s", "tokens_per_s"):
        out[k] = statistics.median(r[k] for r in runs)
    return out


def _summary(name: str, rows: list[dict]) -> dict:
    return {"server": name, "requests": len(rows), "tokens": sum(r["tokens"] for r in rows),
            "ttft_ms_median": 1000 * statistics.median(r["ttft_s"] for r in rows),
            "ttft_ms_mean": 1000 * statistics.mean(r["ttft_s"] for r in rows),
            "tok_s_median": statistics.median(r["tokens_per_s"] for r in rows),
            "tok_s_total": sum(r["tokens"] for r in rows) / sum(r["total_s"] for r in rows),
            "accept": sum(r["tokens"] for r in rows) / sum(r["tokens"] / r["accept"] for r in rows)}


def main(argv=None) -> int:
    args = _parse_args(argv)
    servers = dict(s.split("=", 1) for s in args.server)
    clients = {name: _client(url) for name, url in servers.items()}
    prompts = _prompts(args.questions, args.last)
    for c, model in clients.values():  # warm-up: first requests pay one-off costs
        _one_request(c, model, "Hi", 8)
    results: dict[str, list[dict]] = {name: [] for name in servers}
    for i, prompt in enumerate(prompts):
        order = list(servers) if i % 2 == 0 else list(reversed(servers))
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(args.repeats):
            for name in order:
                runs[name].append(_one_request(*clients[name], prompt, args.max_tokens))
        for name in servers:
            results[name].append(_median_run(runs[name]))
        print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(
            f"{n} {r[-1]['tokens']} tok {r[-1]['tokens_per_s']:.1f} tok/s ttft {1000 * r[-1]['ttft_s']:.0f} ms"
            for n, r in results.items()), file=sys.stderr)
    _print_table(results, prompts)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


def _print_table(results: dict[str, list[dict]], prompts: list[str]) -> None:
    names = list(results)
    ref = _summary(names[0], results[names[0]])
    same = sum(len({results[n][i]["text"] for n in names}) == 1 for i in range(len(prompts)))
    print("| server | requests | tokens | TTFT median (ms) | TTFT mean (ms) | tok/s median | tok/s total "
          f"| tokens/step | tok/s vs {names[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        s = _summary(n, results[n])
        print(f"| {n} | {s['requests']} | {s['tokens']} | {s['ttft_ms_median']:.0f} | {s['ttft_ms_mean']:.0f} "
              f"| {s['tok_s_median']:.1f} | {s['tok_s_total']:.1f} | {s['accept']:.2f} "
              f"| {s['tok_s_total'] / ref['tok_s_total']:.2f}x |")
    print(f"\nidentical replies across servers: {same}/{len(prompts)}")


if __name__ == "__main__":
    sys.exit(main())
