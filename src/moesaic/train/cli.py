"""``moesaic``: the command line. ``train`` a MoE language model, ``generate`` text, run the ``bench``es.

    moesaic train configs/tiny.toml [--nproc N] [--device auto|cpu|cuda] [--out runs/NAME] [--resume]
                  [--set engine.optimizer.params.lr=1e-3] ...
    moesaic train --hf PATH [config] [--data FILE_OR_DIR] [--nproc N] [--out runs/NAME] [--set ...]
    moesaic generate --checkpoint runs/NAME --prompt "def "
    moesaic bench layer|ep|optimizer|mixed-precision|checkpoint|train [args...]

``train`` with ``--nproc N > 1`` starts N processes itself on 127.0.0.1 with torchrun's environment
(:mod:`moesaic.train.launcher`: Ctrl-C/SIGTERM stop every rank after the same step with a checkpoint,
and a failing rank's error is shown once); started by an external ``torchrun`` it joins that group
instead. Every config, memory, data and output-folder check runs before any process starts. ``--set key.path=value``
reaches every key of the config tree (``docs/config-reference.md``); the value is TOML.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

from moesaic import checkpoint
from moesaic._config import parse_override
from moesaic.checkpoint import CheckpointError
from moesaic.checkpoint.names import POINTER
from moesaic.layer.identity import ExpertIndex
from moesaic.models import GPT, GPTConfig
from moesaic.parallel.comm import CollectiveError
from moesaic.parallel.launch import LaunchEnv, resolve_device

from . import heartbeat
from .config import load_train_config
from .data import load_corpus
from .launcher import launch, write_error_file
from .gpt import GPTRun
from .loop import check_memory, check_out_dir, finished_message, run_training
from .stop import Aborted, Stopped, abort_on_signals

BENCHES = {"layer": "bench_layer.py", "ep": "bench_ep.py", "optimizer": "bench_param_groups.py",
           "mixed-precision": "bench_mixed_precision.py", "checkpoint": "bench_checkpoint.py",
           "train": "bench_train.py"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moesaic", description="Mixture-of-Experts training with moesaic.")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a byte-level MoE language model",
                        description="Train a byte-level MoE GPT on the Python standard library's sources (or "
                                    "--set data.path=...). Writes checkpoints, CSV/TensorBoard logs and PNG plots.")
    tr.add_argument("config_file", nargs="?", help="TOML or JSON config (same as --config)")
    tr.add_argument("--config", dest="config_flag", help="TOML or JSON config, e.g. configs/tiny.toml")
    tr.add_argument("--nproc", type=int, help="processes to run (overrides train.nproc); each holds "
                                              "num_experts/ep_size experts of every MoE layer")
    tr.add_argument("--device", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:<index>' "
                                     "(overrides train.device)")
    tr.add_argument("--out", help="run folder (default runs/<config name>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tr.add_argument("--data", help="a text file or folder to train on instead of the standard library")
    tr.add_argument("--hf", metavar="PATH", help="fine-tune the Hugging Face MoE model in this folder (Mixtral, "
                                                 "Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS) instead of the byte-level "
                                                 "GPT, and export <out>/hf at the end (docs/hf-bridge.md); the config "
                                                 "is optional, of [model] only block_size and ep_size apply")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key by its path, e.g. --set train.steps=50 or "
                         "--set engine.optimizer.params.lr=1e-3 (TOML syntax for the value; keys: "
                         "docs/config-reference.md)")
    tr.add_argument("--quiet", action="store_true", help="no progress output")
    tr.add_argument("--resume-command", help=argparse.SUPPRESS)  # from the launcher: what the user typed, resumed

    gen = sub.add_parser("generate", help="sample text from a trained run",
                         description="Load a run's latest checkpoint on one process (whatever ep_size trained it) "
                                     "and continue a prompt.")
    gen.add_argument("--checkpoint", required=True, help="a run folder (runs/NAME) or its checkpoints folder")
    gen.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes")
    gen.add_argument("--seed", type=int, default=0)

    be = sub.add_parser("bench", help="run a benchmark from a source checkout's benchmarks/",
                        description="Run one of the benchmark scripts of a moesaic source checkout, found as "
                                    "benchmarks/ in the working directory or one above it; extra arguments are "
                                    "passed through (see each script's --help).")
    be.add_argument("name", choices=sorted(BENCHES))
    be.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def _load_config(args):
    path = args.config_flag or args.config_file
    if args.config_flag and args.config_file and args.config_flag != args.config_file:
        raise ValueError(f"two configs given: {args.config_file!r} and --config {args.config_flag!r}")
    if path is None and getattr(args, "hf", None) is None:
        raise ValueError("no config: pass one, e.g. `moesaic train configs/tiny.toml`")
    overrides = dict(parse_override(o) for o in args.overrides)
    for flag, key in (("nproc", "train.nproc"), ("data", "data.path"), ("device", "train.device")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if path is None:  # --hf without a config: its defaults
        from .hf import HF_DEFAULTS
        return load_train_config(copy.deepcopy(HF_DEFAULTS), overrides), args.hf
    return load_train_config(path, overrides), path


def _program() -> List[str]:
    """How the user started moesaic: the console script as typed (``.venv/bin/moesaic``) or the module."""
    arg0 = sys.argv[0] if sys.argv else ""
    return [arg0] if os.path.basename(arg0) == "moesaic" else [sys.executable, "-m", "moesaic"]


def _drop_flag(argv: List[str], flag: str, takes_value: bool) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def resume_command(argv: List[str], out: Path) -> str:
    """The command that continues this run: the same arguments with ``--out`` and ``--resume``."""
    args = _drop_flag(_drop_flag(argv, "--resume", False), "--resume-command", True)
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return shlex.join(_program() + args + ["--resume"])


def _hf_checks(cfg, hf_path: Path) -> None:
    """``train --hf``'s checks before any process starts: the folder, the config, the tokenizer."""
    from moesaic.hf.files import open_folder

    from .hf import check_hf_config, load_tokenizer

    open_folder(hf_path)
    check_hf_config(cfg)
    load_tokenizer(hf_path)


def cmd_train(args, argv: List[str], env: LaunchEnv) -> int:
    """``train CONFIG`` (the byte-level GPT, :mod:`moesaic.train.gpt`) or ``train --hf PATH`` (a Hugging Face MoE
    model, :mod:`moesaic.train.hf`): one path, the kind of run decides the model, the data and the export."""
    cfg, path = _load_config(args)
    if args.hf is not None:
        from .hf import HFRun

        kind, out = HFRun(args.hf), Path(args.out or Path("runs") / Path(args.hf).name)
    else:
        kind, out = GPTRun(), Path(args.out or Path("runs") / Path(path).stem)
    command = args.resume_command or resume_command(argv, out)
    if env.launched:  # one rank of a launch (moesaic's launcher or torchrun)
        run_training(kind, cfg, out, resume=args.resume, quiet=args.quiet, env=env, resume_command=command)
        return 0
    # checks that must fail before any process starts
    if args.hf is not None:
        _hf_checks(cfg, Path(args.hf))
    device = resolve_device(cfg.train.device, key="train.device")
    check_memory(kind, cfg, device, cfg.train.nproc)
    load_corpus(cfg.data.path, cfg.data.val_percent, cfg.data.suffixes)
    step = check_out_dir(out, cfg, args.resume, kind.fixed_model_keys)
    if args.resume and step is not None and step >= cfg.train.steps:
        print(finished_message(out, step, cfg))
        return 0
    nproc = cfg.train.nproc
    if nproc == 1:
        run_training(kind, cfg, out, resume=args.resume, quiet=args.quiet, env=env, resume_command=command)
        return 0
    worker_args = _drop_flag(argv, "--nproc", True) + ["--out", str(out), "--set", f"train.nproc={nproc}",
                                                       "--resume-command", command]
    return launch(worker_args, nproc, threads_per_process=max(1, (os.cpu_count() or 1) // nproc),
                  dist_timeout_s=cfg.train.dist_timeout_s)


def generate_checkpoints(root: Path) -> Path:
    """The checkpoints folder ``generate --checkpoint ROOT`` reads: ``ROOT/checkpoints`` (a run folder) or ``ROOT``.

    Raises:
        FileNotFoundError: ``ROOT`` does not exist, or holds no checkpoint (no ``latest`` in either
            place); the message says which.
        ValueError: ``ROOT`` is a file.
    """
    what = "a run folder written by `moesaic train` (runs/NAME) or its checkpoints folder"
    if not root.exists():
        raise FileNotFoundError(f"--checkpoint {root}: the folder does not exist; pass {what}")
    if not root.is_dir():
        raise ValueError(f"--checkpoint {root}: not a folder; pass {what}")
    ckpts = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not (ckpts / POINTER).exists():
        raise FileNotFoundError(f"--checkpoint {root}: no checkpoint in it (no {ckpts / POINTER} file); "
                                f"pass {what}")
    return ckpts


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    ckpts = generate_checkpoints(Path(args.checkpoint))
    folder = checkpoint.resolve(ckpts)
    manifest = checkpoint.read_manifest(folder)
    model_cfg = dict((manifest.get("model_config") or {}).get("model") or {})
    if not model_cfg:
        raise ValueError(f"{folder}: the checkpoint carries no model config; was it written by `moesaic train`?")
    model_cfg["ep_size"] = 1  # one process holds every expert, whatever ep_size trained them
    model = GPT(GPTConfig.from_dict(GPTConfig.upgrade(model_cfg)))
    checkpoint.load(ckpts, model, index=ExpertIndex.build(model))
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise ValueError("--prompt must not be empty")
    idx = torch.tensor([list(prompt)], dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g)
    sys.stdout.write(bytes(out[0].tolist()).decode("utf-8", errors="replace") + "\n")
    return 0


def find_benchmarks(start: Path) -> Path:
    """The ``benchmarks/`` folder of the moesaic checkout holding ``start`` (``start`` itself or a parent).

    Benchmarks are scripts of a source checkout, not part of the installed package; an installed
    ``moesaic`` finds them from the working directory, as ``git`` finds its repository.
    """
    for folder in (start, *start.parents):
        if (folder / "benchmarks" / BENCHES["layer"]).is_file():
            return folder / "benchmarks"
    raise FileNotFoundError(f"no benchmarks/ folder of a moesaic checkout in {start} or above it: `moesaic bench` "
                            f"runs the scripts of a source checkout; cd into one (git clone ... moesaic) first")


def cmd_bench(args) -> int:
    script = find_benchmarks(Path.cwd()) / BENCHES[args.name]
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found in this checkout")
    return subprocess.call([sys.executable, str(script), *args.args])


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError, CollectiveError)


def _fail(command: str, err: BaseException, env: LaunchEnv, user_error: bool) -> int:
    """Report an error that ends this process: to the launcher's error file when there is one (it shows
    the root cause once), else on stderr (a configuration error as one line)."""
    if env.error_file is not None:
        write_error_file(env.error_file, err, env.rank, user_error=user_error)
        return 2 if user_error else 1
    if not user_error:
        raise err
    print(f"moesaic {command}: error: {err}", file=sys.stderr)
    return 2


def _end_worker(code: int) -> None:
    """A launched rank that failed ends at once: its error is recorded, and a process group left in the middle
    of a collective can abort the interpreter's normal exit (C++ ``terminate`` from a live gloo thread)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        env = LaunchEnv.from_environ()
    except ValueError as err:
        print(f"moesaic {args.command}: error: {err}", file=sys.stderr)
        return 2
    code = _main(args, argv, env)
    if code not in (0, None) and env.launched and args.command == "train":
        _end_worker(code)
    return code


def _main(args, argv: List[str], env: LaunchEnv) -> int:
    try:
        if args.command == "train":
            if env.launched:
                abort_on_signals()  # SIGTERM during start-up: a clean "aborted", as Ctrl-C
                heartbeat.start_from_environ()  # moesaic's launcher watches this process (train.dist_timeout_s)
            return cmd_train(args, argv, env)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_bench(args)
    except Stopped as stop:
        if env.rank == 0:
            print(stop.line(), flush=True)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # a second signal, or one before training began: nothing saved
        if env.rank == 0:
            print(f"moesaic {args.command}: aborted, nothing saved", file=sys.stderr)
        return stop.exit_code if isinstance(stop, Aborted) else 130
    except USER_ERRORS as err:
        return _fail(args.command, err, env, user_error=True)
    except Exception as err:  # a bug: its traceback, once (through the launcher when there is one)
        return _fail(args.command, err, env, user_error=False)


if __name__ == "__main__":
    sys.exit(main())
