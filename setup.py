"""Package layout: the library lives in lib/smedjan, the stage tools in tools/.

pyproject.toml holds all metadata; this file only maps the two source folders onto
the import names `smedjan` and `smedjan_tools`, which declarative config cannot do
for sub-packages discovered at build time.
"""
from setuptools import find_packages, setup

packages = ["smedjan"] + [f"smedjan.{p}" for p in find_packages("lib/smedjan")]
packages += ["smedjan_tools"] + [f"smedjan_tools.{p}" for p in find_packages("tools")]

setup(
    packages=packages,
    package_dir={"smedjan": "lib/smedjan", "smedjan_tools": "tools"},
    package_data={"smedjan": ["py.typed"], "smedjan_tools.serve": ["static/*"]},
)
