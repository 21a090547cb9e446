"""The op table is the one list of ops: the docs, the header check and the dispatch follow it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from binarize_cli.core.errors import FormatError
from binarize_cli.runtime import model as runtime_model
from binarize_cli.runtime.format import check_header
from binarize_cli.runtime.optable import OPS, markdown_table, node_problem, sync_doc

ROOT = Path(__file__).resolve().parents[2]
FORMAT_DOC = ROOT / "docs" / "format.md"
RUNTIME = ROOT / "binarize_cli" / "runtime"


def test_docs_op_list_is_the_table() -> None:
    text = FORMAT_DOC.read_text()
    assert sync_doc(text) == text, (
        "docs/format.md's op list differs from binarize_cli/runtime/optable.py; regenerate it: "
        'python -c "from pathlib import Path; from binarize_cli.runtime.optable import sync_doc; '
        "p = Path('docs/format.md'); p.write_text(sync_doc(p.read_text()))\""
    )
    for spec in OPS.values():
        assert f"| `{spec.name}` |" in markdown_table()


def test_docs_section_5_names_every_bconv2d_attribute_and_tensor() -> None:
    text = FORMAT_DOC.read_text()
    section = text[text.index("## 5.") : text.index("## 6.")]
    spec = OPS["bconv2d"]
    for name, _ in (*spec.attrs, *spec.optional_attrs, *spec.tensors, *spec.optional_tensors):
        assert f"`{name}`" in section, name


def test_sync_doc_rewrites_a_stale_block_and_needs_the_markers() -> None:
    text = FORMAT_DOC.read_text()
    stale = text.replace("| `relu` | 1 |", "| `relu` | 2 |")
    assert stale != text and sync_doc(stale) == text
    with pytest.raises(ValueError):
        sync_doc("no markers here")


def test_dispatch_is_built_from_the_table() -> None:
    """Every table op has a runtime builder, and the runtime handles no op the table lacks."""
    assert set(runtime_model.DISPATCH) == set(OPS)
    assert set(runtime_model._BUILDERS) == set(OPS)


def _node(op: str, **kw) -> dict:
    node = {"name": "n", "op": op, "inputs": ["input"], "attrs": {}}
    node.update(kw)
    return node


def test_node_problem_reads_attrs_and_input_counts_from_the_table() -> None:
    assert node_problem(_node("relu")) is None
    assert "unknown" in (node_problem(_node("log_softmax")) or "")
    assert "stride" in (node_problem(_node("conv2d")) or "")
    assert "3 inputs" in (node_problem(_node("add", inputs=["a", "b", "c"])) or "")
    assert node_problem(_node("add", inputs=["a", "b"])) is None
    assert node_problem(_node("cat", inputs=["a", "b", "c"], attrs={"dim": 1})) is None
    assert "1 inputs" in (node_problem(_node("constant")) or "")


def test_check_header_rejects_a_node_the_table_forbids() -> None:
    import json

    meta = {"format": "binarize-packed", "format_version": "1", "bit_order": "lsb-first"}
    graph = {"inputs": ["input"], "outputs": ["n"], "nodes": [_node("relu", inputs=[])]}
    with pytest.raises(FormatError, match="0 inputs"):
        check_header({**meta, "graph": json.dumps(graph)}, "f")
    graph["nodes"] = [_node("relu")]
    assert check_header({**meta, "graph": json.dumps(graph)}, "f") == graph


def test_runtime_imports_only_itself_numpy_safetensors_and_torch_free_core() -> None:
    allowed = re.compile(
        r"^(numpy|safetensors|binarize_cli\.runtime|binarize_cli\.core\.(errors|files)|"
        r"__future__|ctypes|math|os|re|json|time|dataclasses|functools|typing|pathlib|"
        r"collections|hashlib|subprocess|sys|tempfile|platform|shutil|sysconfig|threading)(\.|$)"
    )
    for path in sorted(RUNTIME.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert allowed.match(name), f"{path.name} imports {name}"


def test_a_binarized_activation_needs_its_domain() -> None:
    attrs = {a: 1 for a in OPS["bconv2d"].required_attrs}
    node = {
        "name": "c",
        "op": "bconv2d",
        "inputs": ["x"],
        "attrs": {**attrs, "activation_bases": 3},
    }
    assert node_problem(node) == "node 'c' (bconv2d) lacks attributes ['activation_domain']"
    assert (
        node_problem({**node, "attrs": {**node["attrs"], "activation_domain": "zero_one"}}) is None
    )
    assert node_problem({**node, "attrs": {**attrs, "activation_bases": 0}}) is None
