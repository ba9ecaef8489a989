"""Where a compiled XLA program's time goes: the top ops of one traced call (XLA CPU).

    prof = top_ops(lambda: jax.block_until_ready(step(...)), compiled.as_text())
    prof["top"]  # [{"op", "ms", "calls", "kind", "shape"}, ...]; prof["dot_ms"], prof["total_ms"]

One ``jax.profiler`` trace of the call, read back with ``jax.profiler.ProfileData``: the durations of the
events on XLA's worker-thread lines, summed per HLO instruction name (a fusion, a while loop's body ops, a
scatter), each named op classed by the compiled module's text (``dot`` when it or the computation it calls
holds a dot). On CPU the ops of one program run one after another, each on the pool's threads, so the sum is
close to the call's wall time; it is a breakdown, not a second timing.
"""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path
from typing import Callable

_SKIP = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await")


def _instructions(hlo_text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(instruction name -> its definition, computation name -> its body lines) of an HLO module's text."""
    defs, comps, cur = {}, {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(1), [])
            continue
        inst = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if inst:
            defs[inst.group(1)] = inst.group(2)
            if cur is not None:
                cur.append(inst.group(2))
    return defs, comps


def _kind(name: str, definition: str, comps: dict[str, list[str]]) -> str:
    called = re.search(r"calls=%?([\w.\-]+)", definition)
    body = comps.get(called.group(1), []) if called else []
    text = " ".join([definition] + body)
    for kind in ("dot", "scatter", "gather", "while", "dynamic-update-slice", "broadcast", "copy", "transpose"):
        if f" {kind}(" in text or name.startswith(kind):
            return kind
    return "elementwise"


def top_ops(call: Callable[[], object], hlo_text: str, n: int = 8) -> dict:
    """Trace one ``call()`` (which must block until its outputs are ready) and break its time down by op."""
    import jax
    with tempfile.TemporaryDirectory(prefix="xla_profile_") as tmp:
        jax.profiler.start_trace(tmp)
        try:
            call()
        finally:
            jax.profiler.stop_trace()
        planes = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not planes:
            return {"error": "the profiler wrote no trace"}
        data = jax.profiler.ProfileData.from_file(str(planes[-1]))
    total, calls = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA") or line.name.startswith("tf_XLAPjRt"):
                continue
            for ev in line.events:
                if ev.name not in _SKIP:
                    total[ev.name] += ev.duration_ns
                    calls[ev.name] += 1
    defs, comps = _instructions(hlo_text)
    kinds = collections.Counter()
    for name, ns in total.items():
        kinds[_kind(name, defs.get(name, ""), comps)] += ns
    top = [{"op": name, "ms": round(ns / 1e6, 1), "calls": calls[name],
            "kind": _kind(name, defs.get(name, ""), comps), "shape": defs.get(name, "?").split(" ")[0]}
           for name, ns in total.most_common(n)]
    return {"total_ms": round(sum(total.values()) / 1e6, 1), "dot_ms": round(kinds["dot"] / 1e6, 1),
            "by_kind_ms": {k: round(v / 1e6, 1) for k, v in kinds.most_common()}, "top": top}
