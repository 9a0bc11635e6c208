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
OFFLINE = (
    "python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheels "
    "-r wheels/requirements.txt flowerbed-*.whl"
)
OFFLINE_WINDOWS = (
    "py -3.11 -m venv .venv; .venv\\Scripts\\pip install --no-index --find-links wheels "
    "-r wheels\\requirements.txt (Get-Item flowerbed-*.whl).FullName"
)
