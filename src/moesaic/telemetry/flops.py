"""FLOPs counting and DeepSpeed's ``flops_profiler`` report, on torch's own flop counter.

:class:`FlopsProfiler` runs each forward and backward of the model under
``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of the operations that
actually execute (matmuls, convolutions, attention) and attributes the forward's to every module
on the stack. Because the count follows execution, an MoE layer costs what its experts really
computed: each expert's FLOPs are those of the tokens it received (active, not total,
parameters), and the layer is the router's FLOPs plus the sum over its experts. Elementwise
operations (activations, softmax, the dispatch's gathers) count zero, as in torch's counter.

Every step the engine reads :meth:`FlopsProfiler.step_metrics`: the FLOPs this rank executed
(forward + backward), per token of the first MoE layer (or per sample), the achieved FLOP/s over
the step's wall time and, on CUDA, the model FLOPs utilisation against the device's peak. At the
profile step it also times every module's forward and writes :meth:`FlopsProfiler.report`, a
per-module tree of parameters, forward FLOPs, latency and FLOP/s, with each expert's tokens.

The counting mode is a Python dispatch mode: it costs time on every operation, paid only while
``flops_profiler.enabled`` is true (measured here: a 16-wide attention + MoE block's forward and
backward took about 5x as long on one CPU thread; large matmuls amortise it).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._checks import check_bool, check_int
from ..layer.experts import Experts
from ..layer.identity import MoELayerBase

#: dense bf16/fp16 tensor-core peaks (FLOP/s) by a substring of ``torch.cuda.get_device_name()``
CUDA_PEAK_FLOPS: Tuple[Tuple[str, float], ...] = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("L40S", 362e12), ("L4", 121e12), ("V100", 125e12),
)


def cuda_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None off CUDA or for an unknown device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in CUDA_PEAK_FLOPS:
        if key in name:
            return peak
    return None


def _human(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


class FlopsProfiler:
    """Count a model's FLOPs every step; profile its modules at one step (see module docstring).

    Args:
        model: the model (the engine's ``module``).
        module_depth: deepest module level shown in the detailed tree (-1: all).
        top_modules: modules listed per depth in the aggregated profile.
        detailed: include the per-module tree.
    """

    def __init__(self, model: nn.Module, *, module_depth: int = -1, top_modules: int = 1,
                 detailed: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.module_depth = check_int(module_depth, "module_depth", lo=-1)
        self.top_modules = check_int(top_modules, "top_modules", lo=1)
        self.detailed = check_bool(detailed, "detailed")
        self._root = type(model).__name__
        self._names = {m: n for n, m in model.named_modules()}
        self._moe_layers = [m for m in model.modules() if isinstance(m, MoELayerBase)]
        # per-module experts by module name: (container, local index), whatever the container calls its list
        self._experts: Dict[str, Tuple[Experts, int]] = {
            self._names[e]: (m, i) for m in model.modules() if isinstance(m, Experts) for i, e in enumerate(m.copies)}
        self.reset()

    # --- counting -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the counts of the current step."""
        self.forward_flops: Dict[str, int] = defaultdict(int)  # module name ("" = the model) -> forward FLOPs
        self.backward_flops = 0
        self.forward_s: Dict[str, float] = defaultdict(float)
        self.expert_tokens: Dict[str, int] = defaultdict(int)
        self.tokens = 0
        self.samples = 0
        self._start: Optional[float] = None

    @contextlib.contextmanager
    def forward(self, samples: int = 0, timed: bool = False):
        """Count the FLOPs of a forward (per module); ``timed`` also times every module and expert input."""
        if self._start is None:
            self._start = time.perf_counter()
        self.samples += samples
        handles = self._hooks(timed)
        mode = FlopCounterMode(display=False)
        try:
            with mode:
                yield
        finally:
            for h in handles:
                h.remove()
        prefix = self._root + "."
        for name, ops in mode.get_flop_counts().items():
            if name == "Global":
                continue
            key = "" if name == self._root else (name[len(prefix):] if name.startswith(prefix) else None)
            if key is not None:
                self.forward_flops[key] += int(sum(ops.values()))

    @contextlib.contextmanager
    def backward(self):
        """Count the FLOPs of a backward (in total: a backward has no module stack)."""
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.backward_flops += int(mode.get_total_flops())

    def _hooks(self, timed: bool) -> List:
        handles = []
        first_moe = self._moe_layers[0] if self._moe_layers else None
        if first_moe is not None:
            def count_tokens(module, args):
                if args and isinstance(args[0], torch.Tensor):
                    self.tokens += args[0].reshape(-1, args[0].shape[-1]).shape[0]
            handles.append(first_moe.register_forward_pre_hook(count_tokens))
        if not timed:
            return handles
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        starts: Dict[nn.Module, List[float]] = defaultdict(list)

        def pre(module, args):
            sync()
            starts[module].append(time.perf_counter())
            name = self._names.get(module)
            if name in self._experts and args and isinstance(args[0], torch.Tensor):
                self.expert_tokens[name] += args[0].shape[0]

        def post(module, args, out):
            sync()
            self.forward_s[self._names.get(module, "?")] += time.perf_counter() - starts[module].pop()

        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        return handles

    # --- results ------------------------------------------------------------------------------------
    def step_flops(self) -> int:
        """FLOPs this rank executed since :meth:`reset` (forward + backward)."""
        return self.forward_flops.get("", 0) + self.backward_flops

    def step_metrics(self, device: torch.device) -> Dict[str, float]:
        """The step's figures: ``flops``, ``flops_per_token`` (or ``flops_per_sample``), ``flops_per_s``,
        ``mfu`` (CUDA with a known peak)."""
        flops = self.step_flops()
        seconds = time.perf_counter() - self._start if self._start is not None else float("nan")
        out: Dict[str, float] = {"flops": float(flops),
                                 "flops_per_s": flops / seconds if seconds > 0 else float("nan")}
        if self.tokens:
            out["flops_per_token"] = flops / self.tokens
        elif self.samples:
            out["flops_per_sample"] = flops / self.samples
        peak = cuda_peak_flops(device)
        if peak is not None and seconds > 0:
            out["mfu"] = flops / seconds / peak
        return out

    def module_flops(self, module: nn.Module) -> int:
        """Forward FLOPs counted for ``module`` (a submodule of the model) since :meth:`reset`."""
        try:
            return int(self.forward_flops.get(self._names[module], 0))
        except KeyError:
            raise ValueError(f"module {type(module).__name__} is not part of the profiled model") from None

    def report(self, step: int, *, world_size: int = 1, batch_size: Optional[int] = None) -> str:
        """DeepSpeed's profile layout: summary, the top modules per depth, and the per-module tree."""
        modules = dict(self.model.named_modules())
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items()}
        fwd = self.forward_flops.get("", 0)
        fwd_s = self.forward_s.get("", 0.0)
        total_params = params[""] or 1
        lines = ["-------------------------- moesaic Flops Profiler --------------------------",
                 f"Profile Summary at step {step}:",
                 "Notations: number of parameters (params), floating-point operations (flops) counted by "
                 "torch.utils.flop_counter as executed (an expert: the tokens it received), FLOP/s (FLOPS)",
                 "",
                 f"{'world size:':<50}{world_size}",
                 f"{'batch size per GPU:':<50}{batch_size if batch_size is not None else '-'}",
                 f"{'params per GPU:':<50}{_human(params[''], '')}",
                 f"{'fwd flops per GPU:':<50}{_human(fwd, 'FLOPs')}",
                 f"{'bwd flops per GPU:':<50}{_human(self.backward_flops, 'FLOPs')}",
                 f"{'fwd+bwd flops per GPU:':<50}{_human(fwd + self.backward_flops, 'FLOPs')}",
                 f"{'fwd latency:':<50}{fwd_s * 1e3:.2f} ms",
                 f"{'fwd FLOPS per GPU:':<50}{_human(fwd / fwd_s if fwd_s else 0.0, 'FLOPS')}"]
        if self.tokens:
            per_token = (fwd + self.backward_flops) / self.tokens
            lines.append(f"{'fwd+bwd flops per token:':<50}{_human(per_token, 'FLOPs')}")
        lines += ["", "----------------------------- Aggregated Profile per GPU -----------------------------",
                  f"Top {self.top_modules} modules in terms of params, flops or fwd latency at different model depths:"]
        by_depth: Dict[int, List[str]] = defaultdict(list)
        for n in modules:
            if n:
                by_depth[n.count(".")].append(n)
        for depth in sorted(by_depth):
            names = by_depth[depth]

            def top(values, fmt):
                ranked = sorted(names, key=lambda n: -values(n))[:self.top_modules]
                return "{" + ", ".join(f"'{n}': '{fmt(values(n))}'" for n in ranked) + "}"
            lines.append(f"depth {depth}:")
            lines.append(f"    params      - {top(lambda n: params[n], lambda v: _human(v, ''))}")
            flops = top(lambda n: self.forward_flops.get(n, 0), lambda v: _human(v, "FLOPs"))
            latency = top(lambda n: self.forward_s.get(n, 0.0), lambda v: f"{v * 1e3:.2f} ms")
            lines.append(f"    flops       - {flops}")
            lines.append(f"    fwd latency - {latency}")
        if self.detailed:
            lines += ["", "------------------------------ Detailed Profile per GPU ------------------------------",
                      "Each module: params, % of params, fwd flops, % of fwd flops, fwd latency, % of fwd latency, "
                      "fwd FLOPS (experts: tokens received)", ""]
            for n, m in modules.items():
                depth = 0 if not n else n.count(".") + 1
                if self.module_depth != -1 and depth > self.module_depth:
                    continue
                f = self.forward_flops.get(n, 0)
                s = self.forward_s.get(n, 0.0)
                extra = ""
                if n in self._experts:
                    container, i = self._experts[n]
                    number = container.local_numbers[i]
                    extra = f", expert {number}: {self.expert_tokens.get(n, 0)} tokens received"
                lines.append(f"{'  ' * depth}{n or self._root} ({type(m).__name__}): {_human(params[n], '')}, "
                             f"{100 * params[n] / total_params:.2f}% Params, {_human(f, 'FLOPs')}, "
                             f"{100 * f / fwd if fwd else 0.0:.2f}% FLOPs, {s * 1e3:.3f} ms, "
                             f"{100 * s / fwd_s if fwd_s else 0.0:.2f}% latency, "
                             f"{_human(f / s if s else 0.0, 'FLOPS')}{extra}")
        lines.append("------------------------------------------------------------------------------")
        return "\n".join(lines)
