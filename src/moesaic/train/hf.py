"""``moesaic train --hf PATH``: fine-tune a Hugging Face MoE model with the engine and export it back.

The run is :func:`run_hf`, executed by every process, and follows ``moesaic train``'s run
(:mod:`.loop`) with a Hugging Face model in place of the byte-level GPT:

1. join the process group, seed, check the config (the same on every rank);
2. the model: ``moesaic.hf.load(PATH, ep_size=model.ep_size)`` (each rank reads only its experts),
   its tokenizer from the same folder;
3. the data: text of ``data.path`` (default: the standard library's sources) cut into windows of
   ``model.block_size`` tokens. Window ``i`` of step ``s`` on rank ``r`` is read at an offset drawn
   from ``(train.seed, r, s, i)`` and tokenized on the spot, so nothing is tokenized ahead and a
   resumed run sees exactly the batches it would have seen;
4. train: ``moesaic.hf.causal_lm_loss`` (the model's CE + ``router_aux_loss_coef * aux_loss`` +
   the layers' own losses) through the engine (per-expert groups named ``<module path>/expert_<n>``,
   group-by-group stepping, telemetry in ``<out>/logs``); the validation loss every
   ``train.eval_every`` steps; checkpoints in ``<out>/checkpoints`` (``--resume`` continues one);
5. at the end: the Hugging Face folder ``<out>/hf`` (``moesaic.hf.save`` + the tokenizer),
   ``history.json``, ``summary.json`` (the whole run's seconds and tokens/s and its segments,
   :mod:`.timing`) and plots.

With instruction or chat data as ``data.path`` (a ``.jsonl``/``.json``/``.parquet`` file, a folder
of them, a ``datasets`` ``save_to_disk`` folder: :mod:`.sft_data`), step 3 instead tokenizes every
row once into ``<out>/data`` (rank 0; the others wait and read it memory-mapped), and steps take
rows of a best-fit packed stream (:mod:`.packing`; ``data.packing``) with the loss on the answers
only (``data.train_on``), normalised by the target tokens of the whole step (:mod:`.sft`). The data
files' hashes are kept in the checkpoints: a resume on changed data is refused, naming the file.

Config: a ``moesaic train`` config (``[engine]``, ``[train]``, ``[data]``); of ``[model]`` only
``block_size`` (tokens per sequence) and ``ep_size`` apply, and any other model key is an error
rather than silently ignored. Without a config file :data:`HF_DEFAULTS` apply.
"""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import time
import warnings
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import moesaic
import moesaic.hf
from moesaic.hf.families import describe_auto_map, family_of
from moesaic.hf.files import open_folder
from moesaic.models import GPTConfig
from moesaic.parallel.launch import LaunchEnv

from .config import TrainConfig
from . import sft, sft_data
from .data import ByteCorpus, load_corpus
from .heartbeat import phase
from .hf_memory import check_hf_memory
from .loop import initialize_engine, join_processes
from .packing import RowStream
from .stop import Stopped, StopRequest
from .timing import RunClock, check_segments

HF_DEFAULTS = {
    "model": {"block_size": 256},
    "train": {"steps": 100, "eval_every": 50, "eval_batches": 4, "checkpoint_every": 0, "log_every": 10},
    "engine": {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
               "moe": {"split_by": "expert"}},
}
HF_MODEL_KEYS = ("block_size", "ep_size")


def check_hf_config(cfg: TrainConfig) -> None:
    """Refuse ``[model]`` keys an HF run would ignore (the architecture comes from the folder's config.json)."""
    defaults, here = GPTConfig().to_dict(), cfg.model.to_dict()
    ignored = [f"model.{k}={here[k]!r}" for k in here if k not in HF_MODEL_KEYS and here[k] != defaults[k]]
    if ignored:
        raise ValueError(f"--hf takes the architecture from the model folder's config.json; of [model] only "
                         f"{['model.' + k for k in HF_MODEL_KEYS]} apply, so {', '.join(ignored)} would be ignored: "
                         "remove them")


def load_tokenizer(path: Path):
    """The folder's tokenizer (a ValueError naming the folder when it has none).

    The folder's model must be a supported family (checked first, before ``transformers`` reads
    its config), and its code is never run: a ``tokenizer_config.json`` whose ``auto_map`` names
    the folder's own tokenizer class gets ``transformers``' built-in one, or an error naming it.
    """
    import transformers

    folder, raw = open_folder(path)
    family_of(raw, str(folder / "config.json"))
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json / tokenizer.model); "
                         "--hf trains on text and needs the model's tokenizer in its folder")
    tok_config = path / "tokenizer_config.json"
    auto_map = None
    if tok_config.is_file():
        try:
            auto_map = json.loads(tok_config.read_text()).get("auto_map")
        except (json.JSONDecodeError, AttributeError):
            auto_map = None  # transformers reports a malformed file itself
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except ValueError as e:
        if not auto_map:
            raise
        raise ValueError(f"{tok_config}: auto_map asks to run the folder's own tokenizer code "
                         f"({describe_auto_map(auto_map)}) and transformers has no built-in class for it; moesaic "
                         "never runs a model folder's code (trust_remote_code=False): save the tokenizer with a "
                         "built-in class (e.g. tokenizer.json)") from e
    if auto_map:
        warnings.warn(f"{tok_config}: auto_map asks to run the folder's own tokenizer code "
                      f"({describe_auto_map(auto_map)}); moesaic never runs a model folder's code "
                      f"(trust_remote_code=False): transformers' {type(tokenizer).__name__} is used instead",
                      UserWarning, stacklevel=2)
    return tokenizer


class TokenWindows:
    """Windows of ``block_size`` tokens cut from a byte corpus, tokenized when drawn (see module docstring).

    Args:
        corpus: the text.
        tokenizer: the model's tokenizer.
        block_size: tokens per window.
        seed: with the rank, step and index, fixes where each window is read.
    """

    def __init__(self, corpus: ByteCorpus, tokenizer, block_size: int, seed: int) -> None:
        self.corpus, self.tokenizer, self.block_size, self.seed = corpus, tokenizer, block_size, seed

    def window(self, *key: int) -> torch.Tensor:
        """The `(block_size,)` token ids of the window ``key`` (e.g. ``(rank, step, micro, row)``)."""
        g = torch.Generator().manual_seed(zlib.crc32(json.dumps([self.seed, *key]).encode()))
        n = self.corpus.num_bytes
        want = 8 * (self.block_size + 1)  # bytes; doubled until the text holds enough tokens
        while True:
            size = min(want, n)
            start = int(torch.randint(0, n - size + 1, (1,), generator=g)) if n > size else 0
            text = bytes(self.corpus.read_range(start, size)).decode("utf-8", errors="ignore")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= self.block_size:
                return torch.tensor(ids[:self.block_size], dtype=torch.long)
            if size == n:
                raise ValueError(f"the corpus {self.corpus!r} holds {len(ids)} tokens, fewer than one window of "
                                 f"model.block_size={self.block_size}; use more text or a smaller block_size")
            want *= 2

    def batch(self, rows: int, *key: int) -> torch.Tensor:
        return torch.stack([self.window(*key, i) for i in range(rows)])


def _evaluate(engine, windows: TokenWindows, batches: int, rows: int, device) -> float:
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(batches):  # the same windows on every rank and at every evaluation
            ids = windows.batch(rows, -1, i).to(device)
            total += float(engine(input_ids=ids, labels=ids).loss)
    engine.train()
    return total / batches


def _train_step(engine, model, train_windows: "TokenWindows", val_windows: "TokenWindows", history: Dict,
                cfg: TrainConfig, micro: int, accum: int, rank: int, device, quiet: bool, stop: StopRequest,
                deadline: Optional[float], save):
    """One optimizer step (``accum`` micro-batches), its records, evaluation and checkpoint.

    Returns ``(signal number or None, out of time, checkpoint saved this step or None)`` as every
    rank agrees on them.
    """
    t = cfg.train
    phase(f"step {engine.global_steps + 1}")
    step_loss = step_aux = 0.0
    for m in range(accum):
        ids = train_windows.batch(micro, rank, engine.global_steps, m).to(device)
        outputs = engine(input_ids=ids, labels=ids,
                         output_router_logits=moesaic.hf.router_aux_loss_coef(model) > 0)
        loss = moesaic.hf.causal_lm_loss(engine, outputs)
        engine.backward(loss)
        engine.step()
        step_loss += float(loss.detach()) / accum
        aux = getattr(outputs, "aux_loss", None)
        step_aux += (float(aux.detach()) if aux is not None else 0.0) / accum
    step = engine.global_steps
    stats = engine.last_metrics.get("moe", {})
    history["train"].append([step, step_loss, step_aux, 0.0])
    for name, figures in stats.items():
        history["load"].setdefault(name, []).append([step] + list(figures["tokens_per_expert"]))
    if rank == 0 and not quiet:
        print(f"step {step}/{t.steps}: loss {step_loss:.4f} aux {step_aux:.4f}", flush=True)
    evaluate = functools.partial(_evaluate, engine, val_windows, t.eval_batches, micro, device)
    return _end_step(engine, step, evaluate, history, cfg, rank, quiet, stop, deadline, save, device)


def _check_block_size(hf_path: Path, block_size: int) -> None:
    limit = json.loads((Path(hf_path) / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and block_size > limit:
        raise ValueError(f"model.block_size={block_size} is larger than the model's max_position_embeddings={limit} "
                         f"({hf_path}/config.json); use model.block_size <= {limit}")


def _prepare_sft_data(cfg: TrainConfig, tokenizer, out: Path, rank: int, world: int) -> Dict:
    """Tokenize the instruction/chat data once (rank 0 first, the others then read it) and make the row streams."""
    d = cfg.data
    tok = sft_data.Tokenizing(tokenizer, cfg.model.block_size, train_on=d.train_on, truncate=d.truncate)
    files = sft_data.file_signature(sft_data.data_files(d.path) +
                                    (sft_data.data_files(d.val_path) if d.val_path else []))

    def prepare():
        return sft_data.prepare(d.path, out / "data", tok, val_path=d.val_path, val_percent=d.val_percent,
                                max_bad_fraction=d.max_bad_fraction, signature=files)

    failed = None
    if rank == 0:
        try:
            train, val = prepare()
        except Exception as e:  # the others must not wait forever for a store that will not come
            failed = e
    if world > 1:
        flag = torch.tensor([failed is not None], dtype=torch.int32)
        dist.broadcast(flag, 0)
        if bool(flag):
            raise failed if failed is not None else RuntimeError("rank 0 could not prepare the data (see its error)")
        if rank != 0:
            train, val = prepare()
    elif failed is not None:
        raise failed
    return {"train": train, "val": val, "files": files, "packing": d.packing,
            "train_rows": RowStream(train.lengths, cfg.model.block_size, cfg.train.seed, d.packing),
            "val_rows": RowStream(val.lengths, cfg.model.block_size, cfg.train.seed, d.packing)}


def _sft_step(engine, data: Dict, history: Dict, cfg: TrainConfig, micro: int, accum: int, rank: int, world: int,
              quiet: bool, stop: StopRequest, deadline: Optional[float], save, device):
    """One optimizer step on instruction/chat rows (:func:`moesaic.train.sft.train_step`), records, eval, checkpoint."""
    t = cfg.train
    phase(f"step {engine.global_steps + 1}")
    t0 = time.perf_counter()
    f = sft.train_step(engine, data["train_rows"], data["train"], engine.global_steps, micro, accum, world, rank,
                       data["packing"])
    seconds = time.perf_counter() - t0
    step = engine.global_steps
    totals = history.setdefault("tokens", {"targets": 0, "real": 0, "computed": 0, "seconds": 0.0})
    totals["targets"] += f.targets
    totals["real"] += f.real
    totals["computed"] += f.computed
    totals["seconds"] += seconds
    history["train"].append([step, f.loss, f.aux, 0.0])
    for name, figures in engine.last_metrics.get("moe", {}).items():
        history["load"].setdefault(name, []).append([step] + list(figures["tokens_per_expert"]))
    if rank == 0 and not quiet:
        print(f"step {step}/{t.steps}: loss {f.loss:.4f} aux {f.aux:.4f} | {f.real * world / seconds:.0f} tok/s, "
              f"{f.targets / seconds:.0f} answer tok/s, padding efficiency {100 * f.real / max(f.computed, 1):.1f}%",
              flush=True)
    evaluate = functools.partial(sft.evaluate, engine, data["val_rows"], data["val"], t.eval_batches, micro,
                                 data["packing"])
    return _end_step(engine, step, evaluate, history, cfg, rank, quiet, stop, deadline, save, device)


def _end_step(engine, step: int, evaluate, history: Dict, cfg: TrainConfig, rank: int, quiet: bool,
              stop: StopRequest, deadline: Optional[float], save, device):
    """After a step of either kind: evaluation when due, the ranks' stop agreement, a checkpoint when due."""
    t = cfg.train
    if step % t.eval_every == 0 or step == t.steps:
        phase(f"evaluation after step {step}")
        val = evaluate()
        history["val"].append([step, val])
        engine.log_metrics({"val": {"loss": val}})
        if rank == 0 and not quiet:
            print(f"step {step}: val loss {val:.4f}", flush=True)
    phase(f"the stop agreement after step {step}")
    signum, late = stop.agree(deadline is not None and time.monotonic() > deadline, device)
    saved = None
    if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or signum or late:
        saved = save(step)
    return signum, late, saved


def run_hf(cfg: TrainConfig, hf_path: Path, out: Path, resume: bool = False, quiet: bool = False,
           env: Optional[LaunchEnv] = None, resume_command: Optional[str] = None) -> Dict:
    """Fine-tune the model in ``hf_path`` (see module docstring); returns the summary on rank 0.

    Raises:
        Stopped: SIGINT/SIGTERM stopped the run; every rank finished its step and the checkpoint
            of that step is saved (no export: the resumed run exports at its end).
    """
    env = LaunchEnv.from_environ() if env is None else env
    t = cfg.train
    phase("joining the process group")
    device, rank, world = join_processes(cfg, env)
    phase("start-up checks")
    if world != t.nproc:
        raise ValueError(f"train.nproc={t.nproc} but {world} processes are running; launch with --nproc {t.nproc}")
    check_hf_config(cfg)
    _, micro, accum = cfg.batch()
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)
    ckpts = out / "checkpoints"
    if not resume and ckpts.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not (ckpts / "latest").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpts} (nothing to resume)")

    note = check_hf_memory(hf_path, cfg, device, env.local_world_size)
    if note and rank == 0 and not quiet:
        warnings.warn(note, RuntimeWarning, stacklevel=2)

    # 1. model, tokenizer, data
    phase("loading the model and building the engine")
    tokenizer = load_tokenizer(hf_path)
    instruction = sft_data.is_dataset_path(cfg.data.path)
    if instruction:
        _check_block_size(hf_path, cfg.model.block_size)
        data = _prepare_sft_data(cfg, tokenizer, out, rank, world)
        if rank == 0 and not quiet:
            for split in ("train", "val"):
                print(data[split].report.line(), flush=True)
    else:
        split = load_corpus(cfg.data.path, cfg.data.val_percent, cfg.data.suffixes)
        train_windows = TokenWindows(split.train, tokenizer, cfg.model.block_size, t.seed)
        val_windows = TokenWindows(split.val, tokenizer, cfg.model.block_size, t.seed)
    # train.recompute (default "none"): fine-tuning runs usually want "block" (exact, see docs/recompute.md)
    model = moesaic.hf.load(hf_path, ep_size=cfg.model.ep_size).to(device)
    if t.recompute != "none":
        moesaic.apply_recompute(model, t.recompute)
    engine = initialize_engine(cfg, rank, quiet, model=model, log_dir=str(out / "logs"), telemetry_every=t.log_every)
    history: Dict = {"train": [], "val": [], "load": {}}
    earlier: List[Dict] = []  # the run's segments before this one (see .timing)
    if resume:
        phase("loading the checkpoint")
        _, client = engine.load_checkpoint(ckpts)
        history = client.get("history", history)
        earlier = check_segments(client.get("segments"), f"--resume: the checkpoint in {ckpts}")
        if instruction:
            sft_data.check_same_data(client.get("data_files", {}), data["files"])

    def save(step: int):
        phase(f"saving checkpoint step{step}")
        state = {"history": history, "segments": clock.segments(step)}
        if instruction:
            state["data_files"] = data["files"]
        return engine.save_checkpoint(ckpts, tag=f"step{step}", client_state=state,
                                      model_config=cfg.to_dict(), keep_last=t.keep_last)

    def on_signal(signum: int) -> None:
        if rank == 0 and not quiet:
            print(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(send it again to abort without saving)", flush=True)

    # 2. train; at every step boundary the ranks agree whether a signal or train.max_minutes stops
    # them (moesaic.train.stop), save together and stop after the same step
    clock = RunClock(earlier, engine.global_steps, micro * accum * cfg.model.block_size * world, world)
    deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None
    signum, late, saved = None, False, None
    with StopRequest(on_first=on_signal) as stop:
        while engine.global_steps < t.steps:
            if instruction:
                signum, late, saved = _sft_step(engine, data, history, cfg, micro, accum, rank, world, quiet, stop,
                                                deadline, save, device)
            else:
                signum, late, saved = _train_step(engine, model, train_windows, val_windows, history, cfg, micro,
                                                  accum, rank, device, quiet, stop, deadline, save)
            if signum or late:
                break
    engine.close()
    step = engine.global_steps
    phase(f"ending the run after step {step} (export)")
    if signum and step < t.steps:  # (a signal during the last step: the run is complete)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        raise Stopped(step, saved, signum, resume_command)
    if late and rank == 0 and not quiet:
        print(f"stopped early: train.max_minutes={t.max_minutes} ran out at step {step} of {t.steps}; "
              f"checkpoint {saved}; the export below holds the model at step {step}", flush=True)
    # 3. export and report
    export = out / "hf"
    moesaic.hf.save(model, export)
    summary: Dict = {}
    if rank == 0:
        tokenizer.save_pretrained(str(export))
        timing = clock.summary(step)  # every segment of the run: seconds and tokens/s of the whole run
        summary = {"steps": engine.global_steps, "target_steps": t.steps, "complete": step >= t.steps,
                   "val_loss": history["val"][-1][1] if history["val"] else math.nan,
                   "tokens_per_s": timing["tokens_per_s"], "seconds": timing["seconds"], "world_size": world,
                   "segments": timing["segments"], "export": str(export)}
        if instruction and "tokens" in history:  # rows are not full: count the real tokens
            figures = history["tokens"]
            summary.update(answer_tokens_per_s=figures["targets"] / max(figures["seconds"], 1e-9),
                           tokens_per_s=figures["real"] * world / max(figures["seconds"], 1e-9),
                           padding_efficiency=figures["real"] / max(figures["computed"], 1),
                           data={k: v.report.__dict__ for k, v in (("train", data["train"]), ("val", data["val"]))})
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        from .plots import write_plots

        plots: List[Path] = write_plots(history, out / "plots")
        if not quiet:
            print(f"\nHugging Face folder: {export}\ncheckpoints: {ckpts}\nlogs: {out / 'logs'}\n"
                  f"plots: {', '.join(str(p) for p in plots) or 'none'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
