"""scripts/code_metrics.py on a small made-up package: folders, long files, cycles and duplicated blocks found."""

import json
import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "code_metrics.py"
BLOCK = "\n".join(f"    total = total + value_{i} * {i}" for i in range(8))


def test_code_metrics_reports_folders_long_files_cycles_and_duplicated_blocks(tmp_path):
    pkg = tmp_path / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text(f"from pkgx import b\n\n\ndef f():\n{BLOCK}\n")
    (pkg / "b.py").write_text("from pkgx import a\n" + "".join(f"x{i} = {i}\n" for i in range(600)))
    (pkg / "sub" / "c.py").write_text(f"def g():\n    total = 0\n{BLOCK}\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(pkg), "--json", "--keys", "total"],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["folders"] == {".": {"files": 3, "lines": 12 + 601}, "sub": {"files": 2, "lines": 10}}
    assert report["files_over_500_lines"] == {"b.py": 601}
    assert report["import_cycles"] == [["pkgx.a", "pkgx.b"]]
    assert report["duplicated_blocks"] == 1
    [block] = report["duplicates"]
    assert block["lines"] == 8 and block["a"] == "a.py:5-12" and block["b"] == "sub/c.py:3-10"
    assert report["key_files"] == {"total": ["a.py", "sub/c.py"]}


def test_code_metrics_refuses_a_path_that_is_not_a_folder(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a folder" in done.stderr
