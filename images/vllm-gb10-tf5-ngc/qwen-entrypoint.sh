#!/bin/sh
# Entrypoint of vllm-gb10-tf5-ngc and the images built on it: when a model asks for a
# chat template (QWEN35_CHAT_TEMPLATE_MODEL_ID or _SOURCE), install it first; a model
# that asks and has none does not start. Then NVIDIA's entrypoint runs the command.
set -e
if [ -n "${QWEN35_CHAT_TEMPLATE_MODEL_ID:-}${QWEN35_CHAT_TEMPLATE_SOURCE:-}" ]; then
    python3 /usr/local/bin/install_chat_template.py
fi
exec /opt/nvidia/nvidia_entrypoint.sh "$@"
