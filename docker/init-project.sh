#!/usr/bin/env bash
# Lays the ftlib project out on the shared volume, once. The compose `work` volume and the Kubernetes
# PVC start empty, yet every Airflow task and GPU pod works in that checkout (FTLIB_PROJECT_DIR): it
# needs params.yaml, dvc.yaml, the data, ftlib/ (dvc.yaml's stages depend on its files) and git.
#   init-project.sh TEMPLATE DEST          the Airflow image keeps TEMPLATE at /opt/ftlib/project
#   FTLIB_DVC_REMOTE=s3://bucket/prefix    the default DVC remote (unset: the template's own)
#   FTLIB_DVC_ENDPOINT=http://minio:9000   S3-compatible endpoint (unset for AWS S3)
# Credentials never go into the config: DVC reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the
# environment when it pushes. Nothing here contacts the remote.
set -euo pipefail
template=${1:?usage: init-project.sh TEMPLATE DEST}
dest=${2:?usage: init-project.sh TEMPLATE DEST}

# A restart, or a second deployment on the same volume, must never overwrite work: any sign of a
# project leaves DEST as it is (emptiness is no test: an ext4 PVC holds lost+found).
for mark in params.yaml dvc.yaml .git .dvc; do
  if [ -e "$dest/$mark" ]; then
    echo "init-project: $dest already holds a project ($mark); left as it is"
    exit 0
  fi
done

mkdir -p "$dest"
cp -R "$template/." "$dest/"
cd "$dest"
git init -q -b main
if [ -n "${FTLIB_DVC_REMOTE:-}" ]; then
  old=$(dvc config core.remote 2>/dev/null || true)   # the template's ../dvc-storage lies outside the volume
  dvc remote add --default storage "$FTLIB_DVC_REMOTE"
  if [ -n "${FTLIB_DVC_ENDPOINT:-}" ]; then
    dvc remote modify storage endpointurl "$FTLIB_DVC_ENDPOINT"
  fi
  if [ -n "$old" ] && [ "$old" != storage ]; then
    dvc remote remove "$old"
  fi
fi
git add -A
git -c user.name=ftlib -c user.email=ftlib@localhost commit -q -m "ftlib project laid out by docker/init-project.sh"
echo "init-project: $dest initialised (DVC remote: $(dvc remote list | tr -s '\t ' ' '))"
