"""Replay a forward pass as a captured CUDA graph, one graph per input shape.

An eager SD-Turbo forward launches about two thousand small kernels; on a fast GPU the cpu cannot
issue them as quickly as the GPU runs them, so a 512x512 image costs the launch time, not the
arithmetic. A CUDA graph records the launches once and replays them with one call.

A graph replays the same kernels on the same memory: the inputs are copied into tensors the graph
owns, and every weight it reads must keep its storage. The fast path's folds and switches write
the weights in place (`turbo.fast.path`), so one graph per input shape serves every model, direction
and gamma; gamma itself is an input tensor, not a constant baked into the graph.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # owned by the graph: callers' tensors are copied in
    output: torch.Tensor


class GraphCache:
    """`GraphCache(fn)(*tensors)` = `fn(*tensors)`, replayed from a CUDA graph captured on the first
    call with these shapes, dtypes and strides. `fn` must take and return CUDA tensors only, and read
    no other tensor whose storage changes between calls (values may change in place).

    Keeps the `max_graphs` most recently used graphs; each holds its activations' memory. Not
    thread-safe (the pipeline serialises calls)."""

    def __init__(self, fn: Callable[..., torch.Tensor], max_graphs: int = 4, warmup: int = 2):
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.eager = False  # set when a capture failed: then every call runs `fn` directly

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fn(*tensors)
        key = tuple((t.shape, t.dtype, t.stride()) for t in tensors)
        entry = self.graphs.pop(key, None)
        if entry is None:
            try:
                entry = self._capture(tensors)
            except RuntimeError as err:  # e.g. an op that synchronises, which a capture forbids
                logger.warning("CUDA graph capture failed, running eagerly from now on: %s", err)
                self.eager = True
                self.graphs.clear()
                return self.fn(*tensors)
        self.graphs[key] = entry  # most recently used last
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        for owned, t in zip(entry.inputs, tensors, strict=True):
            owned.copy_(t)
        entry.graph.replay()
        return entry.output.clone()  # the next replay overwrites the graph's output

    def clear(self) -> None:
        """Drop every graph (their memory goes back to torch's cache)."""
        self.graphs.clear()

    def _capture(self, tensors: tuple[torch.Tensor, ...]) -> _Graph:
        inputs = tuple(t.clone() for t in tensors)  # clone keeps the strides (channels_last)
        # Warm up on a side stream, as torch.cuda.graphs asks: library handles, workspaces and
        # cuDNN's algorithm choices are made outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs)
        logger.debug("captured a CUDA graph for inputs %s", [tuple(t.shape) for t in tensors])
        return _Graph(graph, inputs, output)
