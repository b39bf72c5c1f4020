#!/usr/bin/env bash
# Makes a development CA and the certificates switchyard's mutual TLS needs, with openssl:
#   ca.crt                            the CA both sides trust
#   worker.crt / worker.key           server certificate every worker presents; its name is
#                                     `switchyard-worker` (coordinators dial workers by IP and
#                                     check this name: --worker-tls-domain) plus 127.0.0.1
#   coordinator.crt / coordinator.key client certificate coordinators present to workers (and
#                                     to etcd)
#   etcd.crt / etcd.key               server certificate of etcd (`etcd`, `*.etcd-peer`,
#                                     localhost, 127.0.0.1); workers present worker.crt to etcd
#   api.crt / api.key                 server certificate of the OpenAI API (serve --tls-cert):
#                                     `switchyard`, `localhost`, 127.0.0.1
#   admin/root.crt, root.key, ca.crt  etcd's root user (CN=root), for `switchyard cluster rbac`
#                                     and operators; a Secret of its own, never mounted in
#                                     workers or coordinators:
#   kubectl create secret generic switchyard-etcd-admin --from-file=OUT_DIR/admin
#
#   deploy/tls/make-dev-ca.sh OUT_DIR [CA_NAME]
#   kubectl create secret generic switchyard-tls --from-file=OUT_DIR   # what deploy/ mounts
#
# For development and tests only: keys are unencrypted and valid for 30 days. Production
# clusters issue these from their own CA (cert-manager, Vault, ...) into the same Secret keys.
set -euo pipefail
out=${1:?usage: make-dev-ca.sh OUT_DIR [CA_NAME]}
name=${2:-switchyard-dev-ca}
mkdir -p "$out"
cd "$out"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 30 -subj "/CN=$name" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.crt 2>/dev/null

leaf() { # name cn extensions
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr" 2>/dev/null
  printf '%b' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 30 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
leaf worker switchyard-worker \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:switchyard-worker,IP:127.0.0.1\n"
leaf coordinator switchyard-coordinator \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
leaf etcd etcd \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:etcd,DNS:*.etcd-peer,DNS:localhost,IP:127.0.0.1\n"
leaf api switchyard \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:switchyard,DNS:localhost,IP:127.0.0.1\n"
mkdir -p admin
leaf admin/root root \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
cp ca.crt admin/ca.crt
rm -f ca.srl
chmod 600 ./*.key admin/*.key
echo "wrote $out: ca.crt worker.crt worker.key coordinator.crt coordinator.key etcd.crt etcd.key api.crt api.key admin/{root.crt,root.key,ca.crt}" >&2
