"""Fine-tuning on chat data: moesaic's packed answers-only run vs ``transformers``' blocks fed padded batches (issue 25).

The data is ``data/stdlib_chat.jsonl`` (docstring -> source conversations from the standard library),
tokenized once with a byte-level BPE tokenizer trained on it (vocabulary ``--vocab``, ChatML template),
assistant turns as the targets. The model is bench_hf.py's OLMoE shape (8 layers, 64 experts, k=8,
D=256, expert hidden 128), built from ``OlmoeConfig`` and saved once. Each contender runs in fresh
processes with ``torch.optim.AdamW``, the same micro-batch token budget (``--batch x --seq`` tokens)
and the model's loss with its balance loss:

* ``moesaic-packed``: ``moesaic.hf.load(folder)``; rows of ``--seq`` tokens packed best-fit, each
  document attending only to itself; ``moesaic.hf.answer_loss`` (pads, at the end of rows, reach
  no expert);
* ``hf-padded``: ``AutoModelForCausalLM.from_pretrained(folder)`` (``transformers``' default experts
  implementation); the documents in the same order, as many per micro-batch as fit the budget when
  padded to the longest of them (a DataCollatorForLanguageModeling-style padded batch),
  ``model(input_ids, attention_mask, labels, output_router_logits=True).loss``, a plain loop.

Figures: answer (target) tokens trained per second over the steps after ``--warmup``, contenders
round-robin, the ratio the median over rounds of the same round's rates; padding efficiency (real
tokens / tokens computed); the step peak memory (processes where glibc returns large blocks, RSS
follows the live tensors: the peak RSS over three steps after a warm-up step, minus the RSS before).

Target (issue 25): answer tokens/s >= 1.5x hf-padded at a step peak memory no higher.

    python benchmarks/bench_sft.py --rounds 2 --out benchmarks/results/sft.json
    python benchmarks/bench_sft.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hf import SHAPE_ARGUMENTS, add_shape_arguments, check_positive, run_worker  # noqa: E402  (fresh worker processes with the allocator set per mode)

CONTENDERS = ("hf-padded", "moesaic-packed")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(args, folder: Path) -> None:
    """The model folder (OLMoE shape, a tokenizer trained on the data) and the tokenized store under it."""
    import tokenizers
    import transformers

    from moesaic.train.sft_data import Tokenizing, prepare

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    texts = [m["content"] for r in rows for m in r["messages"]]
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=specials,
                                                                  initial_alphabet=alphabet))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    cfg = transformers.OlmoeConfig(hidden_size=args.hidden, intermediate_size=args.expert_hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   num_experts=args.experts, num_experts_per_tok=args.top_k, vocab_size=len(tok),
                                   max_position_embeddings=args.seq, norm_topk_prob=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    prepare(args.data, folder / "data", Tokenizing(tok, args.seq, truncate=True), val_percent=1, max_bad_fraction=1.0)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def batches(name: str, store, seq: int, batch: int, steps: int):
    """Each step's micro-batch as the contender feeds it, with its target, real and computed token counts."""
    from moesaic.train.packing import IGNORE, RowStream, collate

    if name == "moesaic-packed":
        stream = RowStream(store.lengths, seq, seed=0, packing=True)
        for i in range(steps):
            b = collate(store, stream.rows(i * batch, batch), packed=True)
            yield b, b["targets"], int(b["token_mask"].sum()), b["token_mask"].numel()
        return
    order = [row[0] for row in RowStream(store.lengths, seq, seed=0, packing=False).rows(0, 4 * steps * batch)]
    at = 0
    for _ in range(steps):
        docs, longest = [], 0
        while at < len(order) and (len(docs) + 1) * max(longest, int(store.lengths[order[at]])) <= batch * seq:
            longest = max(longest, int(store.lengths[order[at]]))
            docs.append(order[at])
            at += 1
        ids = torch.full((len(docs), longest), 0, dtype=torch.long)
        labels = torch.full((len(docs), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(docs), longest, dtype=torch.long)
        for b, d in enumerate(docs):
            tokens, targets = store.document(d)
            t = torch.from_numpy(tokens.astype("int64"))
            ids[b, :len(t)], mask[b, :len(t)] = t, 1
            labels[b, 1:len(t)] = torch.where(torch.from_numpy(targets[1:].astype(bool)), t[1:], IGNORE)
        yield ({"input_ids": ids, "attention_mask": mask, "labels": labels}, int((labels != IGNORE).sum()),
               int(mask.sum()), mask.numel())


def worker(name: str, folder: str, mode: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """One contender in this process: ``mode`` "time" or "memory"."""
    import transformers

    import moesaic.hf
    from moesaic.train.sft_data import TokenStore

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    store = TokenStore(next(Path(folder, "data").iterdir()) / "train")
    if name == "moesaic-packed":
        model = moesaic.hf.load(folder).train()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b, targets):
        if name == "moesaic-packed":
            loss, _, _ = moesaic.hf.answer_loss(model, b, denominator=targets)
        else:
            loss = model(**b, output_router_logits=True, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    data = list(batches(name, store, seq, batch, steps))
    if mode == "memory":
        step(data[0][0], data[0][1])
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _kib("VmRSS")
        for b, targets, _, _ in data[1:4]:
            step(b, targets)
        return {"step_peak_mib": (_kib("VmHWM") - before) / 1024}
    t_start, counted = None, [0, 0, 0]
    for i, (b, targets, real, computed) in enumerate(data):
        if i == warmup:
            t_start = time.perf_counter()
        step(b, targets)
        if i >= warmup:
            counted = [counted[0] + targets, counted[1] + real, counted[2] + computed]
    elapsed = time.perf_counter() - t_start
    return {"answer_tokens_per_s": counted[0] / elapsed, "tokens_per_s": counted[1] / elapsed,
            "padding_efficiency": counted[1] / counted[2], "answer_tokens": counted[0], "seconds": elapsed}


def _spawn(name, folder, mode, args) -> dict:
    return run_worker(__file__, name, folder, mode, ["--steps", args.steps if mode == "time" else 4,
                                                     "--warmup", args.warmup, "--batch", args.batch, "--seq", args.seq])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "stdlib_chat.jsonl"))
    add_shape_arguments(ap, seq=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 layers, 16 experts, k=4, 6 steps, 1 round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sft.json"))
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.mode, args.steps, args.warmup, args.batch, args.seq)))
        return
    if args.quick:
        args.layers, args.experts, args.top_k, args.steps, args.warmup, args.rounds = 2, 16, 4, 6, 1, 1
    check_positive(args, SHAPE_ARGUMENTS + ("steps", "rounds"))
    if not 0 <= args.warmup < args.steps or args.steps < 4:
        raise SystemExit(f"need --steps >= 4 and --warmup in [0, --steps), got {args.steps}, {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "olmoe"
        build(args, folder)
        rounds = []
        for r in range(args.rounds):
            rounds.append({name: _spawn(name, folder, "time", args) for name in CONTENDERS})
            print(f"round {r + 1}: " + ", ".join(f"{n} {v['answer_tokens_per_s']:.0f} answer tok/s"
                                                 for n, v in rounds[-1].items()), flush=True)
        memory = {name: _spawn(name, folder, "memory", args) for name in CONTENDERS}
    result = {"shape": {k: getattr(args, k) for k in ("layers", "experts", "top_k", "hidden", "expert_hidden", "vocab",
                                                      "seq", "batch", "steps", "warmup", "rounds")},
              "torch_threads": torch.get_num_threads(), "rounds": rounds, "memory": memory, "summary": {}}
    table = ["| contender | answer tokens/s (median) | vs hf-padded (median of rounds) | padding efficiency | "
             "step peak MiB | vs hf-padded |", "|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        speed = statistics.median(r[name]["answer_tokens_per_s"] for r in rounds)
        ratio = statistics.median(r[name]["answer_tokens_per_s"] / r["hf-padded"]["answer_tokens_per_s"]
                                  for r in rounds)
        eff = statistics.median(r[name]["padding_efficiency"] for r in rounds)
        peak = memory[name]["step_peak_mib"]
        mem = peak / memory["hf-padded"]["step_peak_mib"]
        result["summary"][name] = {"answer_tokens_per_s": speed, "speed_ratio": ratio, "padding_efficiency": eff,
                                   "step_peak_mib": peak, "memory_ratio": mem}
        table.append(f"| {name} | {speed:.0f} | {ratio:.2f}x | {100 * eff:.1f}% | {peak:.0f} | {mem:.2f}x |")
    print("\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
