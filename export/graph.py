"""Reading the exported ONNX graph: which module a node came from, and which nodes must stay FP32.

The dynamo exporter names nodes after the FX graph (``node_pow_1``, ``node_mean``,
``node_linear_21``), which says nothing of the layer; what a node computes is told by its op
type and by the PyTorch module path the exporter keeps in the node's ``metadata_props``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from filterserve.errors import FilterServeError

# Per node: the PyTorch module scopes it was traced in, root first, then the FX node's own name.
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# RMSNorm is x · 1/sqrt(mean(x²) + eps) · weight; opset 18 has no Rsqrt, so rsqrt is exported as
# Sqrt then Reciprocal (or a Div). The casts are Qwen2RMSNorm's own upcast and downcast (present
# when the graph is not already fp32).
NORM_OPS = frozenset({"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul", "Cast"})
NORM_SIGNATURE = frozenset({"Pow", "ReduceMean", "Sqrt"})
LINEAR_OPS = frozenset({"MatMul", "Gemm"})


def module_path(node: onnx.NodeProto) -> str | None:
    """The PyTorch module an ONNX node came from (``model.model.layers.0.input_layernorm``), if recorded.

    ``""`` is the root module (the scoring graph's own ops); None means the exporter recorded nothing.
    """
    scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
    if scopes is None:
        return None
    names = ast.literal_eval(scopes)
    return names[-2] if len(names) >= 2 else None


def node_key(node: onnx.NodeProto) -> str:
    """A node's name as TensorRT's ONNX parser (onnx-tensorrt ``getNodeName``) names it: unnamed ones after their first output."""
    return node.name or f"node_of_{node.output[0]}"


@dataclass(frozen=True)
class Fp32Selection:
    """Nodes whose FP16 arithmetic can overflow or round away the result, grouped by why."""

    norms: dict[str, tuple[str, ...]]  # module path → its nodes
    softmax: tuple[str, ...]
    head: tuple[str, ...]
    graph_nodes: frozenset[str]  # every node, to tell a selected node's layers from another node's

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(n for group in self.norms.values() for n in group) | set(self.softmax) | set(self.head)

    def summary(self) -> dict[str, int]:
        return {"norms": len(self.norms), "norm_nodes": sum(map(len, self.norms.values())),
                "softmax": len(self.softmax), "head_nodes": len(self.head)}


def fp32_nodes(model: onnx.ModelProto) -> Fp32Selection:
    """Every RMSNorm's ops, every Softmax, and the score head with what follows it to the outputs.

    - RMSNorm: x² overflows FP16 for |x| > 256, and Qwen2-1.5B's residual stream gets there
      (docs/design.md). A module is a norm when its nodes compute mean(x²), a square root and a
      scaling, and nothing else (NORM_OPS); every Pow feeding a ReduceMean in the graph must lie
      in such a module, or the module paths are missing and the selection would be incomplete.
    - Softmax: exp of the attention scores, summed over up to 512 keys.
    - Head: the last linear layers before each graph output (the score head, the weighted sum)
      and every node between them and the outputs (the pooling gather, the cast to FP32): the
      scores are 0-10 and FP16 would round them to 1/128.
    """
    nodes = list(model.graph.node)
    if not any(p.key == NAME_SCOPES for n in nodes for p in n.metadata_props):
        raise FilterServeError(
            f"the ONNX graph records no module paths ({NAME_SCOPES} in node metadata): the FP32 layers "
            "cannot be found; use the model filterserve export wrote (torch's dynamo exporter)"
        )
    by_module: dict[str | None, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        by_module[module_path(node)].append(node)
    norms = {
        path: tuple(node_key(n) for n in group)
        for path, group in by_module.items()
        if path is not None and _computes_rms_norm({n.op_type for n in group})
    }
    in_norms = {n for group in norms.values() for n in group}
    consumers = _consumers(nodes)
    for node in nodes:
        if node.op_type == "Pow" and any(c.op_type == "ReduceMean" for c in consumers[node.output[0]]):
            if node_key(node) not in in_norms:
                raise FilterServeError(
                    f"{node_key(node)} squares a tensor for a mean (a norm) outside any module recognised as RMSNorm "
                    f"(module {module_path(node)!r}): the FP32 selection would miss it"
                )
    softmax = tuple(node_key(n) for n in nodes if n.op_type == "Softmax")
    return Fp32Selection(
        norms=norms,
        softmax=softmax,
        head=_head(nodes, [o.name for o in model.graph.output]),
        graph_nodes=frozenset(map(node_key, nodes)),
    )


def _computes_rms_norm(ops: set[str]) -> bool:
    return ops <= NORM_OPS and NORM_SIGNATURE <= ops and bool(ops & {"Reciprocal", "Div", "Mul"})


def _consumers(nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def _head(nodes: list[onnx.NodeProto], outputs: Iterable[str]) -> tuple[str, ...]:
    """Nodes that are descendants of the linear layers nearest the outputs and ancestors of an output."""
    producer = {out: node for node in nodes for out in node.output}
    consumers = _consumers(nodes)

    def walk(start: list[onnx.NodeProto], step, stop=lambda node: False) -> set[str]:
        seen: set[str] = set()
        stack = list(start)
        while stack:
            node = stack.pop()
            if node_key(node) in seen:
                continue
            seen.add(node_key(node))
            if not stop(node):
                stack.extend(step(node))
        return seen

    def upstream(node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [producer[name] for name in node.input if name in producer]

    def downstream(node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [c for out in node.output for c in consumers[out]]

    ends = [producer[name] for name in outputs]
    near = walk(ends, upstream, stop=lambda node: node.op_type in LINEAR_OPS)
    heads = [n for n in nodes if node_key(n) in near and n.op_type in LINEAR_OPS]
    between = walk(heads, downstream) & walk(ends, upstream)
    return tuple(node_key(n) for n in nodes if node_key(n) in between)
