"""The README's library example runs exactly as written (it is the first thing a user copies)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    text = README.read_text()
    found = re.search(r"<!-- library-example:[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert found, "README.md lost its marked library example"
    return found.group(1)


def test_readme_library_example_runs_as_written(tmp_path):
    (tmp_path / "example.py").write_text(library_example())
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"1\.[5-9]\dx fewer MACs, check: exact", done.stdout), done.stdout
    assert (tmp_path / "pruned.safetensors").exists()
    assert "MMACs per example" in done.stdout
