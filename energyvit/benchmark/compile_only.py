"""The compile suite's backend (compile, fill the caches, run nothing), Inductor's cache counters and
the --inductor option parser."""
from __future__ import annotations

import ast
import collections

import torch


def inductor_option(text: str) -> tuple[str, object]:
    """'KEY=VALUE' -> (KEY, VALUE) for torch.compile(options=...): KEY an option of
    torch._inductor.config (dotted for nested ones), VALUE a Python literal."""
    import torch._inductor.config as inductor_config

    key, sep, value = text.partition("=")
    if not sep or key not in inductor_config.get_config_copy():
        raise ValueError(f"expected KEY=VALUE with KEY an option of torch._inductor.config, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise ValueError(f"the value of {key} must be a Python literal (True, 0, 'name'), got {value!r}") from None


class CompiledOnly(Exception):
    """Raised instead of running a step compiled by compile_only_backend."""


def compile_only_backend(config_patches: dict):
    """A torch.compile backend that compiles as the default (Inductor) backend does, which fills
    AOTAutograd's and Inductor's caches on disk, and then raises CompiledOnly instead of running
    the graph: nothing of the step runs on the device."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        compile_fx(gm, example_inputs, config_patches=config_patches or None)

        def not_run(*args):
            raise CompiledOnly

        return not_run

    return backend


def cache_counts() -> collections.Counter:
    c = torch._dynamo.utils.counters
    return collections.Counter({"hit": c["inductor"]["fxgraph_cache_hit"], "miss": c["inductor"]["fxgraph_cache_miss"]})


def cache_note(before: collections.Counter) -> str:
    """Whether the graphs compiled since `before` came from Inductor's cache on disk."""
    d = cache_counts() - before
    return f"Inductor cache: {d['hit']} hit(s), {d['miss']} miss(es)" if d else ""

