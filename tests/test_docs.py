"""The documentation's tables are rendered from the result files in docs/results, and the README stays short."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tables_module():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_in_the_docs_is_what_its_json_gives(capsys):
    assert tables_module().main(["--check"]) == 0, capsys.readouterr().out


def test_every_measured_table_has_a_renderer_and_the_readme_is_short():
    tables = tables_module()
    for path in tables.DOCUMENTS:
        for name in re.findall(r"<!-- table:([\w.-]+) -->", path.read_text()):
            assert name in tables.TABLES, f"{path.name}: {name}"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_a_changed_result_file_changes_its_table(tmp_path, monkeypatch):
    tables = tables_module()
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- table:candidates -->\nstale\n<!-- /table:candidates -->\n")
    monkeypatch.setattr(tables, "DOCUMENTS", [doc])
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main(["--check"]) == 1
    assert tables.main([]) == 0 and "stale" not in doc.read_text() and "| candidate" in doc.read_text()
    assert tables.main(["--check"]) == 0


def test_result_files_name_no_path_of_the_machine_that_made_them(monkeypatch):
    """The committed JSON reads the same from any clone: commands name paths relative to the checkout."""
    for path in sorted((ROOT / "docs" / "results").glob("*.json")):
        text = path.read_text()
        assert str(ROOT) not in text and not re.search(r'"command": "python /', text), path.name
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import command_line
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_serve.py"), "--json",
                                      str(ROOT / "docs" / "results" / "x.json")])
    assert command_line() == "python benchmarks/bench_serve.py --json docs/results/x.json"
