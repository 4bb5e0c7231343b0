"""Package list for setuptools (everything else is in pyproject.toml).

The HF-convention architectures live in the top-level `modeling/` folder (they are the files a
published checkpoint carries as remote code, kept apart from the package) but install as
`hf_multimax.modeling`, so no generic top-level `modeling` package lands in site-packages. A
pyproject `find` directive cannot rename a folder, hence the few lines here.
"""

from setuptools import find_namespace_packages, find_packages, setup

MODELING = ["hf_multimax.modeling"] + [f"hf_multimax.modeling.{name}" for name in find_packages("modeling")]

setup(
    packages=find_namespace_packages(include=["hf_multimax", "hf_multimax.*"]) + MODELING,
    package_dir={"hf_multimax.modeling": "modeling"},
    # Non-Python files the package reads at run time; a wheel holds only these besides the .py files.
    package_data={
        "hf_multimax.ops.multimax": ["csrc/*.cpp"],  # the fused kernel is compiled where it runs
        "hf_multimax.hub": ["templates/*.md.j2"],  # the model card, rendered at publish time and after fine-tuning
    },
)
