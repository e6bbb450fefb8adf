#!/usr/bin/env python3
"""The image's HEALTHCHECK: healthy while /ping answers 200 on the serving port."""

import os
import sys
import urllib.request

# SAGEMAKER_BIND_TO_PORT: the port SageMaker asks for when several containers share a host
port = os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
