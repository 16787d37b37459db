"""``moesaic train --hf PATH``: fine-tune a Hugging Face MoE model with the engine and export it back.

A kind of run of :mod:`.loop` (:class:`HFRun`), with a Hugging Face model in place of the byte-level GPT:

* the model: ``moesaic.hf.load(PATH, ep_size=model.ep_size)`` (each rank reads only its experts),
  its tokenizer from the same folder; per-expert groups named ``<module path>/expert_<n>``;
  ``train.recompute = "auto"`` is ``"block"`` (exact, :mod:`moesaic.layer.recompute`);
* the data: text of ``data.path`` (default: the standard library's sources) cut into windows of
  ``model.block_size`` tokens (:class:`TextFeed`). Window ``i`` of step ``s`` on rank ``r`` is read
  at an offset drawn from ``(train.seed, r, s, i)`` and tokenized on the spot, so nothing is
  tokenized ahead and a resumed run sees exactly the batches it would have seen; the loss is
  ``moesaic.hf.causal_lm_loss`` (the model's CE + ``router_aux_loss_coef * aux_loss`` + the
  layers' own losses). With instruction or chat data as ``data.path`` (a ``.jsonl``/``.json``/
  ``.parquet`` file, a folder of them, a ``datasets`` ``save_to_disk`` folder: :mod:`.sft_data`)
  the feed is :class:`~.sft.SFTFeed` instead: packed rows, answers-only loss normalised by the
  target tokens of the whole step, the data files' hashes kept in the checkpoints;
* the export: the Hugging Face folder ``<out>/hf`` (``moesaic.hf.save`` + the tokenizer and its
  chat template), written at the end of a run (not of one a signal stopped).

Config: a ``moesaic train`` config (``[engine]``, ``[train]``, ``[data]``); of ``[model]`` only
``block_size`` (tokens per sequence) and ``ep_size`` apply, and any other model key is an error
rather than silently ignored. Without a config file :data:`HF_DEFAULTS` apply.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import moesaic
import moesaic.hf
from moesaic.hf.families import describe_auto_map, family_of
from moesaic.hf.files import open_folder
from moesaic.models import GPTConfig
from moesaic.parallel.launch import LaunchEnv

from . import memory, sft_data
from .config import TrainConfig
from .data import ByteCorpus, load_corpus
from .loop import Feed, RunContext, RunKind, StepRecord, run_training
from .sft import SFTFeed

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


class TextFeed(Feed):
    """Windows of raw text (:class:`TokenWindows`) and the model's causal-LM loss."""

    def __init__(self, ctx: RunContext, tokenizer) -> None:
        cfg = ctx.cfg
        split = load_corpus(cfg.data.path, cfg.data.val_percent, cfg.data.suffixes)
        self.train = TokenWindows(split.train, tokenizer, cfg.model.block_size, cfg.train.seed)
        self.val = TokenWindows(split.val, tokenizer, cfg.model.block_size, cfg.train.seed)

    def step(self, engine, model, ctx: RunContext) -> StepRecord:
        record = StepRecord(0.0, 0.0)
        for m in range(ctx.accum):
            ids = self.train.batch(ctx.micro, ctx.rank, engine.global_steps, m).to(ctx.device)
            outputs = engine(input_ids=ids, labels=ids,
                             output_router_logits=moesaic.hf.router_aux_loss_coef(model) > 0)
            loss = moesaic.hf.causal_lm_loss(engine, outputs)
            engine.backward(loss)
            engine.step()
            record.loss += float(loss.detach()) / ctx.accum
            aux = getattr(outputs, "aux_loss", None)
            record.aux += (float(aux.detach()) if aux is not None else 0.0) / ctx.accum
        return record

    def evaluate(self, engine, model, ctx: RunContext) -> float:
        batches = ctx.cfg.train.eval_batches
        engine.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(batches):  # the same windows on every rank and at every evaluation
                ids = self.val.batch(ctx.micro, -1, i).to(ctx.device)
                total += float(engine(input_ids=ids, labels=ids).loss)
        engine.train()
        return total / batches

    def show_step(self, step: int, record: StepRecord, dropped: float, tokens_per_s: float, ctx: RunContext) -> None:
        ctx.progress.note(f"step {step}/{ctx.cfg.train.steps}: loss {record.loss:.4f} aux {record.aux:.4f}")


def _check_block_size(hf_path: Path, block_size: int) -> None:
    limit = json.loads((Path(hf_path) / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and block_size > limit:
        raise ValueError(f"model.block_size={block_size} is larger than the model's max_position_embeddings={limit} "
                         f"({hf_path}/config.json); use model.block_size <= {limit}")


class HFRun(RunKind):
    """A Hugging Face MoE model folder, fine-tuned and exported back (see module docstring)."""

    default_recompute = "block"
    fixed_model_keys = ("block_size",)

    def __init__(self, hf_path) -> None:
        self.path = Path(hf_path)
        self.tokenizer = None

    def check(self, cfg: TrainConfig) -> None:
        check_hf_config(cfg)

    def identity(self) -> Dict[str, Any]:
        return {"hf": str(self.path)}

    def memory_parts(self, cfg: TrainConfig) -> memory.ModelParts:
        return memory.hf_parts(self.path, cfg.batch()[1] * cfg.model.block_size, cfg.model.ep_size,
                               cfg.train.recompute)

    def open_data(self, ctx: RunContext) -> Feed:
        self.tokenizer = load_tokenizer(self.path)
        if sft_data.is_dataset_path(ctx.cfg.data.path):
            _check_block_size(self.path, ctx.cfg.model.block_size)
            return SFTFeed(ctx, self.tokenizer)
        return TextFeed(ctx, self.tokenizer)

    def build_model(self, ctx: RunContext) -> torch.nn.Module:
        return moesaic.hf.load(self.path, ep_size=ctx.cfg.model.ep_size).to(ctx.device)

    def export(self, model: torch.nn.Module, ctx: RunContext) -> Dict[str, Any]:
        folder = ctx.out / "hf"
        moesaic.hf.save(model, folder)
        if ctx.rank == 0:
            self.tokenizer.save_pretrained(str(folder))
        return {"export": str(folder)}

    def report(self, ctx: RunContext, summary: Dict[str, Any], plots: List[Path], saved: Optional[Path],
               late: bool, resume_command: Optional[str]) -> None:
        t, step = ctx.cfg.train, summary["steps"]
        if late:
            print(f"stopped early: train.max_minutes={t.max_minutes} ran out at step {step} of {t.steps}; "
                  f"checkpoint {saved}; the export below holds the model at step {step}", flush=True)
        print(f"\nHugging Face folder: {summary['export']}\ncheckpoints: {ctx.out / 'checkpoints'}\n"
              f"logs: {ctx.out / 'logs'}\nplots: {', '.join(str(p) for p in plots) or 'none'}")


def run_hf(cfg: TrainConfig, hf_path: Path, out: Path, resume: bool = False, quiet: bool = False,
           env: Optional[LaunchEnv] = None, resume_command: Optional[str] = None) -> Dict:
    """Fine-tune the model in ``hf_path`` (:func:`.loop.run_training` with :class:`HFRun`); the summary on rank 0.

    Raises:
        Stopped: SIGINT/SIGTERM stopped the run; every rank finished its step and the checkpoint
            of that step is saved (no export: the resumed run exports at its end).
    """
    return run_training(HFRun(hf_path), cfg, out, resume=resume, quiet=quiet, env=env, resume_command=resume_command)
