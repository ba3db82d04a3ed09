"""The import layers of docs/architecture.md: `lint-imports` (run by scripts/test.sh) checks the direction between
packages; this checks what it does not, that no module of ours imports itself back through others."""

from __future__ import annotations

import grimp

PACKAGES = ("cvt_core", "cvt_torch", "cvt_tf", "conversion", "cvt_cli")


def _import_cycles(graph) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if child < len(edges[node]):
                work.append((node, child + 1))
                target = edges[node][child]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
            for parent, _ in work[-1:]:
                low[parent] = min(low[parent], low[node])
    return cycles


def test_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"cvt_core.a", "cvt_core.b", "cvt_core.c"}

        @staticmethod
        def find_modules_directly_imported_by(module):
            return {"cvt_core.a": {"cvt_core.b"}, "cvt_core.b": {"cvt_core.a"}, "cvt_core.c": {"cvt_core.a"}}[module]

    assert _import_cycles(Graph) == [["cvt_core.a", "cvt_core.b"]]


def test_no_module_imports_itself_back():
    # imports made for annotations only (`if TYPE_CHECKING:`) never run, so they cannot close a cycle
    graph = grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    assert _import_cycles(graph) == []
