"""The README's Python session runs as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_session_runs_as_printed(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    session = next(b for b in blocks if "init_params" in b)
    exec(compile(session, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([2, 16, 97])" in out and "torch.Size([2, 97, 24])" in out
