"""Fast guards for what the wheel ships (the slow test_wheel.py installs and runs it): a non-Python
file added under hf_multimax/ that setup.py does not declare works in the editable checkout and in
every other test, and is missing only for users."""

import json
import subprocess
import sys
from pathlib import Path

from hf_multimax.hub import card

ROOT = Path(__file__).resolve().parents[2]


def test_every_non_python_file_in_the_package_is_declared_package_data():
    # setup.py's own package_data, read by running it only as far as building the Distribution (no
    # command runs, nothing is written); a subprocess because setup.py finds packages relative to cwd.
    # setuptools first: it makes `distutils` its own copy, the one its setup() stops in.
    script = ("import json, setuptools, distutils.core; "
              "print(json.dumps(distutils.core.run_setup('setup.py', stop_after='init').package_data))")
    read = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    package_data = json.loads(read.stdout.strip().splitlines()[-1])
    declared = {path for package, patterns in package_data.items() for pattern in patterns
                for path in (ROOT / package.replace(".", "/")).glob(pattern)}
    data_files = {path for path in (ROOT / "hf_multimax").rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    assert ROOT / "hf_multimax/hub/templates/multimax.md.j2" in data_files
    undeclared = sorted(str(p.relative_to(ROOT)) for p in data_files - declared)
    assert not undeclared, f"add these to package_data in setup.py, or the wheel lacks them: {undeclared}"


def test_card_template_is_read_from_the_package_not_the_repository():
    # Resolved through importlib.resources from hf_multimax.hub: inside the package folder, wherever
    # that is installed (parents[2] of card.py is site-packages in a wheel install).
    template = Path(str(card.TEMPLATE))
    assert template.is_file() and template.parent.parent == Path(card.__file__).parent
    assert "{{ card_data }}" in card.TEMPLATE.read_text(encoding="utf-8")
