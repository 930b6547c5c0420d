"""The README tells the truth: its quickstart runs, its loss table is current, its set-up
commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_quickstart_runs():
    code = "\n".join(python_blocks("Quickstart"))  # the blocks form one session
    assert "register" in code and "derive" in code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_loss_table_is_current():
    from gesim import symbolic

    table = README.split("<!-- loss-table:start -->\n", 1)[1].split("\n<!-- loss-table:end -->", 1)[0]
    assert table == symbolic.table(fmt="markdown"), (
        "README loss table is stale: paste the output of `python -m gesim conditions --format markdown`")


def test_readme_opens_with_the_two_set_up_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    main_job, tests = (line.split("#")[0].strip() for line in first_block[:2])
    assert main_job == "pip install -e . && python -m gesim.figures"
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
