"""setuptools script that reads nbdev 2's settings.ini (no pkg_resources needed).

pyproject.toml declares the name, version, Python and requirements (copies of settings.ini's fields, which
tests/test_packaging.py checks); this script supplies the rest of the metadata, which pyproject.toml lists
as dynamic, and the packages.
"""

from configparser import ConfigParser

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

setuptools.setup(
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=cfg["license"],
    url=cfg["git_url"],
    keywords=cfg["keywords"],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    zip_safe=False,
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
