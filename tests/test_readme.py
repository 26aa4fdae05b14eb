"""The README opens with the two quick-start commands, and CI (.ci/run) runs the second one verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ('test -d ~/.cache/vitfast-venv || python3 -m venv ~/.cache/vitfast-venv; . ~/.cache/vitfast-venv/bin/activate '
           '&& pip install -r requirements.txt && pip install --no-build-isolation -e ".[dev]"')


def _quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_opens_with_a_quick_start_of_two_commands():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"^## .*", text, flags=re.M).group(0) == "## Quick start"  # the first section
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[0] == f"{INSTALL} && python train.py --method mae-ct"
    assert commands[1] == f"{INSTALL} && pytest"


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    command = _quick_start_commands()[1].replace("~/.cache/vitfast-venv", '"$VENV"')
    assert command in script
    assert 'VENV="${VITFAST_CI_VENV:-${HOME:-/tmp}/.cache/vitfast-ci-venv}"' in script  # CI's own venv
