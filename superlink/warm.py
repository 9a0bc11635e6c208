"""The coordinator's warm ServerApp executor: each run's ServerApp is a fork of one warm process.

The same fork executor as the sites' (:mod:`flowerbed.warmexec`): started by ``flowerbed superlink
start`` in place of ``flower-superexec``, with its flags; torch, flwr's ServerApp runtime and the
kit's ServerApp are imported once, so a run's ServerApp starts in well under a second.
"""

from __future__ import annotations


def preload() -> None:
    """Import what every ServerApp imports, and warm torch up; no thread (see :func:`serve`)."""
    import torch  # noqa: F401

    import flowerbed.serverapp.app  # noqa: F401
    from flowerbed.flower import arrays, superlink
    from flowerbed.warmexec import quick_object_pulls, warm_up_torch

    superlink.serverapp_main()  # imports Flower's ServerApp runtime (checked)

    quick_object_pulls(cap_s=0.5)  # the ServerApp reads each reply's objects from the SuperLink on loopback
    arrays.inflate_arrays_in_one_copy()  # and each reply's model in one copy
    warm_up_torch()


def main() -> None:
    """Each run's ServerApp: Flower's own flwr-serverapp, in a fork."""
    from flowerbed.flower import superlink
    from flowerbed.warmexec import serve

    serve({"flwr-serverapp": superlink.serverapp_main()}, preload)


if __name__ == "__main__":
    main()
