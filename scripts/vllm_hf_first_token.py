"""Why does vLLM CPU's greedy differ from HF's? The first generated position, side by side.

    cd <repo> && VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=1 VLLM_CPU_KVCACHE_SPACE=1 \\
      nice -n 10 /work/venv-vllm/bin/python scripts/vllm_hf_first_token.py --dtype float32 --out first.json

For each held-out arena prompt: the prompt token ids each path builds (transformers' apply_chat_template,
vLLM's `LLM.chat` rendering, and vLLM's prompt text re-tokenized), then, on the SAME ids, the first generated
position's top-k log-probs from vLLM (`SamplingParams(logprobs=k)`) and from transformers (log_softmax of the
last logits, the model loaded from the same folder in the same dtype), and the greedy continuations of both
(--max-tokens). Also which sampling defaults vLLM takes from the model folder (`get_default_sampling_params`),
the rope and tying settings each side reads, and what `LLM.generate` with no SamplingParams does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ARENA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "question.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=Path.home() / ".cache/ctc-drafter/smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--data", type=Path, default=ARENA)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rows = [json.loads(x) for x in args.data.read_text(encoding="utf-8").split("\n") if x.strip()]
    prompts = [r["turns"][0] for r in rows[: args.prompts]]
    tok = AutoTokenizer.from_pretrained(str(args.base))
    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=dtype).eval()
    llm = LLM(model=str(args.base), enforce_eager=True, dtype=args.dtype, max_model_len=2048, seed=0,
              max_num_seqs=1)
    mc = llm.llm_engine.model_config
    defaults = llm.get_default_sampling_params()
    res = {"dtype": args.dtype, "vllm_default_sampling": repr(defaults),
           "vllm_config": {"rope": repr(getattr(mc.hf_config, "rope_parameters", None)),
                           "tie_word_embeddings": mc.hf_config.tie_word_embeddings,
                           "rms_norm_eps": mc.hf_config.rms_norm_eps, "dtype": str(mc.dtype)},
           "hf_config": {"rope": repr(hf.config.rope_parameters), "tie_word_embeddings": hf.config.tie_word_embeddings,
                         "lm_head_is_embedding": hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()},
           "prompts": []}
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.topk)
    for text in prompts:
        msgs = [{"role": "user", "content": text}]
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        chat_out = llm.chat(msgs, greedy, use_tqdm=False)[0]  # vLLM's own rendering of the template
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy, use_tqdm=False)[0]
        gen = out.outputs[0]
        v_first = {int(t): float(lp.logprob) for t, lp in gen.logprobs[0].items()}
        with torch.no_grad():
            x = torch.tensor([ids])
            lp = torch.log_softmax(hf(x).logits[0, -1].float(), -1)
            h_ids = hf.generate(x, max_new_tokens=args.max_tokens, do_sample=False,
                                attention_mask=torch.ones_like(x))[0, len(ids):].tolist()
        h_top = torch.topk(lp, args.topk)
        v_tokens = list(gen.token_ids)
        diff = next((i for i, (a, b) in enumerate(zip(v_tokens, h_ids)) if a != b), None)
        res["prompts"].append({
            "n_prompt": len(ids),
            "chat_ids_equal": list(chat_out.prompt_token_ids) == ids,
            "starts_with": tok.convert_ids_to_tokens(ids[:3]),
            "vllm_top": v_first,
            "hf_top": {int(t): float(v) for t, v in zip(h_top.indices, h_top.values)},
            "first_token_same": v_tokens[0] == h_ids[0],
            "max_abs_logprob_diff_on_vllm_top": max(abs(v - float(lp[t])) for t, v in v_first.items()),
            "first_divergence": diff,
            "chat_path_same_tokens": list(chat_out.outputs[0].token_ids) == v_tokens,
        })
    res["summary"] = {
        "prompts": len(res["prompts"]),
        "first_token_same": sum(p["first_token_same"] for p in res["prompts"]),
        "identical_continuations": sum(p["first_divergence"] is None for p in res["prompts"]),
        "chat_ids_equal": sum(p["chat_ids_equal"] for p in res["prompts"]),
        "max_abs_logprob_diff": max(p["max_abs_logprob_diff_on_vllm_top"] for p in res["prompts"]),
        "divergence_at": [p["first_divergence"] for p in res["prompts"]],
    }
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("dtype", "vllm_default_sampling", "vllm_config", "hf_config", "summary")}))


if __name__ == "__main__":
    main()
