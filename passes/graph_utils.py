"""Small queries on Dynamo's torch-level FX graphs, shared by the passes."""
from __future__ import annotations

import functools
import hashlib

import operator
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.fx import Node

LINEAR = {torch._C._nn.linear, F.linear}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
SOFTMAX = {F.softmax, torch.softmax}
ADD = {operator.add, torch.add, operator.iadd}
MUL = {operator.mul, torch.mul}
MATMUL = {torch.matmul, operator.matmul}

# "...model.layers.3", "...model.layers[3]" -> prefix, index, rest of the path
_LAYER_RE = re.compile(r"^(?P<prefix>.*?)\.?layers(?:\.|\[)(?P<idx>\d+)\]?(?P<rest>.*)$")


def is_call(node: Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_method(node: Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def is_add(node: Node) -> bool:
    return is_call(node, ADD) or is_method(node, "add")


def is_mul(node: Node) -> bool:
    return is_call(node, MUL) or is_method(node, "mul")


def example_value(node):
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node) -> tuple | None:
    v = example_value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def module_path(node: Node) -> tuple[int, str | None, str | None, type | str] | None:
    """(layer index, child module name, grandchild name, the layer's class) from nn_module_stack, or None
    outside layers."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, layer_type in stack.values():
        m = _LAYER_RE.match(_clean_path(path))
        if m and m.group("rest") == "":
            return (*_child_names(int(m.group("idx")), stack, _clean_path(path)), layer_type)
    return None


def layer_ops(graph):
    """(node, module_path(node)) for every op node of `graph` inside a decoder layer, in graph order: what
    both the matcher's regions and verification's signatures group by layer."""
    for n in graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            where = module_path(n)
            if where is not None:
                yield n, where


def _clean_path(path: str) -> str:
    # Dynamo writes "L['args'][0].model.layers.0" or "L['self'].model.layers[0]"; keep the attribute path.
    return re.sub(r"\[(\d+)\]", r".\1", re.sub(r"^L\[[^\]]*\](\[\d+\])?", "", path)).lstrip(".")


def _child_names(idx: int, stack, layer_path: str):
    child = grandchild = None
    for path, _type in stack.values():
        p = _clean_path(path)
        if p.startswith(layer_path + "."):
            parts = p[len(layer_path) + 1:].split(".")
            if child is None:
                child = parts[0]
            if len(parts) >= 2 and grandchild is None:
                grandchild = parts[1]
    return idx, child, grandchild


def external_inputs(region: list[Node]) -> list[Node]:
    """Nodes used by the region but defined outside it, in first-use order."""
    inside = set(region)
    seen: dict[Node, None] = {}
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside:
                seen.setdefault(a, None)
    return list(seen)


def region_output(region: list[Node]) -> Node | None:
    """The last node of the region that is used outside it."""
    inside = set(region)
    outs = [n for n in region if any(u not in inside for u in n.users)]
    return outs[-1] if outs else None


def ancestors(node: Node, stop: set[Node] | None = None, follow=None) -> set[Node]:
    """Every node `node` reads, directly or not; a node in `stop` is neither taken nor followed, and a node for
    which `follow(n)` is false is taken but not followed."""
    seen: set[Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen and (stop is None or a not in stop):
                seen.add(a)
                if follow is None or follow(a):
                    todo.append(a)
    return seen


def _holds_a_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_holds_a_tensor(x) for x in v)
    return False


def _carries_values(n: Node) -> bool:
    v = example_value(n)
    return v is None or n.op == "placeholder" or _holds_a_tensor(v)


def value_ancestors(node: Node) -> set[Node]:
    """The nodes whose values flow into `node`: `ancestors`, without following what only a size, dtype or device
    was read from. Under dynamic shapes a size is a node (`x.size(1)`, a SymInt), and a tensor whose size alone
    reaches `node` (input_ids sizing a mask) is not one of its value sources. A node whose example value holds no
    tensor (an int, a SymInt, a shape) is kept but not followed; a node without an example value is followed."""
    return ancestors(node, follow=_carries_values)


def output_nodes(gm) -> list[Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [a for a in out.all_input_nodes]


def has_side_effect(node: Node) -> bool:
    """Nodes dead-code elimination must keep: FX's own impure set, plus the functorch and grad-mode state
    changes Dynamo records around a vmapped mask (transformers 4.x), whose results are unused."""
    if node.is_impure():
        return True
    if node.op != "call_function":
        return False
    module = getattr(node.target, "__module__", "") or ""
    name = getattr(node.target, "__name__", "") or ""
    return module.startswith(("torch._functorch", "torch._C._functorch")) or name in (
        "_set_grad_enabled", "_enter_autocast", "_exit_autocast", "set_grad_enabled")


def eliminate_dead_code(graph) -> None:
    graph.eliminate_dead_code(is_impure_node=has_side_effect)


def take_place(old: Node, new: Node) -> None:
    """`new` (a node the passes built, of `old`'s shape and dtype) replaces `old` for all its users, with
    old's example value: Dynamo's own method calls on it (`.to(dtype)`) then still read as tensor methods,
    which AOTAutograd's cache needs to accept the graph."""
    for key in ("example_value", "val", "tensor_meta"):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)


@functools.cache
def source_hash() -> str:
    """sha256 of every Python file of the package (its passes included), in path order: what the caches that
    outlive a process (Inductor's, the verdicts) key on, so that an edited helper or pass misses."""
    import spts_compile
    h = hashlib.sha256()
    roots = {Path(__file__).resolve().parent, Path(spts_compile.__file__).resolve().parent}
    for path in sorted({p for r in roots for p in r.rglob("*.py")}):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:32]
