#!/usr/bin/env bash
# Installs what building and testing switchyard needs on a fresh Debian machine, and nothing
# that is already there. Safe to run again.
#   - protoc (Debian's protobuf-compiler) and protobuf's well-known .proto files (libprotobuf-dev):
#     tonic's and etcd-client's code generation run it at build time.
#   - etcd (Debian's etcd-server): the live-membership tests run a real one.
#   - kubectl (Debian's kubernetes-client) and openssl: the deploy and mutual-TLS tests.
#   - g++: the host-side test of the CUDA kernels' source; fonts-dejavu-core: bench's plot.
#   - chromium and chromium-driver: the dashboard test opens /dashboard in headless Chromium.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# etcd-client's protos import protobuf's well-known types (descriptor.proto), from libprotobuf-dev.
[ -f /usr/include/google/protobuf/descriptor.proto ] || [ -n "${PROTOC_INCLUDE:-}" ] || need+=(libprotobuf-dev)
# etcd (Debian's etcd-server): the membership tests start a real one on a loopback port.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# kubectl (Debian's kubernetes-client): the deploy tests render the kustomize overlays with it.
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
# openssl: deploy/tls/make-dev-ca.sh, used by the mutual-TLS test.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# g++: the CUDA kernels' source is also compiled and run as host C++ by the model crate's tests
# (the checks that need no GPU).
command -v g++ >/dev/null 2>&1 || need+=(g++)
# A TrueType font (DejaVu Sans) for the text of `switchyard bench`'s PNG plot.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# Headless Chromium and its WebDriver: the dashboard test renders /dashboard and screenshots it.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The API tests drive the server with the official OpenAI Python client; the deploy tests parse
# the rendered manifests and validate them offline (kubernetes-validate ships the schemas); the
# GGUF tests write GGUF files with llama.cpp's `gguf` package (numpy, no torch).
PYENV=${SWITCHYARD_PYENV:-target/pyenv}
if ! "$PYENV/bin/python" -c 'import openai, pytest, yaml, kubernetes_validate, gguf, numpy, selenium' >/dev/null 2>&1; then
  echo "setup: creating $PYENV with openai, pytest, pyyaml, kubernetes-validate, gguf and selenium" >&2
  [ -x "$PYENV/bin/pip" ] || python3 -m venv "$PYENV"
  "$PYENV/bin/pip" install -q --disable-pip-version-check "openai>=1.40,<4" "pytest>=8,<10" \
    "pyyaml>=6,<7" "kubernetes-validate>=1.30,<2" "gguf>=0.17,<1" "numpy>=1.26,<3" \
    "selenium>=4.20,<5"
fi
