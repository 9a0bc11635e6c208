"""How a site installs flowerbed: one text, used by the kit README, the bundle note and the docs.

A site kit carries the flowerbed wheel (``flowerbed-VERSION-py3-none-any.whl``), and, when the
coordinator built it with ``--bundle``, a ``wheels/`` folder with every other wheel. A test checks
that the site quickstart and the coordinator quickstart quote these commands word for word.
"""

from __future__ import annotations

ONLINE = (
    "conda env create -f environment.yml && conda activate flowerbed-supernode-cpu "
    "&& pip install --no-deps flowerbed-*.whl"
)
# The kit's install scripts (deploy/templates/install-offline.*): a venv, then uv from wheels/ when the
# bundle carries it (several times faster than pip), else pip; no package index either way.
OFFLINE = "./install-offline.sh"
OFFLINE_WINDOWS = ".\\install-offline.ps1"
