#!/bin/sh
# SageMaker starts the image as `IMAGE train` or `IMAGE serve`; anything else runs as
# given (`IMAGE tagmill predict …`, `IMAGE bash`).
set -e
case "$1" in
    train) shift; exec tagmill sagemaker train "$@" ;;
    serve) shift; exec tagmill sagemaker serve "$@" ;;
    *) exec "$@" ;;
esac
