"""Allow ``python -m flowerbed``."""

from flowerbed.cli import main

main()
