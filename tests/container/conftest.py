"""The container tests build tagmill's image and run it: minutes, so they are CI's own
step (`make container-test`), never part of `make test`."""

import os

if os.environ.get("TAGMILL_CONTAINER_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
