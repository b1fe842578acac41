#!/bin/sh
# The image's one non-root user: uid and gid 1000 (the charts' runAsUser and fsGroup), named safealign,
# with a home directory (torch inductor, Triton and vLLM cache there, and getpass looks the name up).
# CUDA's Ubuntu 24.04 bases already have uid 1000 ("ubuntu"), where `useradd --uid 1000` stops the build
# with "UID 1000 is not unique": that user is renamed instead. Any other base gets a new user.
# ROOT: another root directory whose /etc is edited (tests/test_image.py runs this on a copy of a base's).
set -eu
ROOT="${ROOT:-}"
set --
[ -n "$ROOT" ] && set -- --prefix "$ROOT"

owner_of() { awk -F: -v id=1000 '$3 == id { print $1; exit }' "$ROOT/etc/$1"; }

user=$(owner_of passwd)
group=$(owner_of group)
if [ -z "$group" ]; then
    groupadd "$@" --gid 1000 safealign
elif [ "$group" != safealign ]; then
    groupmod "$@" --new-name safealign "$group"
fi
if [ -z "$user" ]; then
    useradd "$@" --uid 1000 --gid 1000 --create-home --home-dir /home/safealign --shell /bin/bash safealign
elif [ "$user" != safealign ]; then
    usermod "$@" --login safealign --gid 1000 --home /home/safealign --move-home "$user"
fi
echo "uid 1000: $(awk -F: '$3 == 1000 { print $1 ":" $6 }' "$ROOT/etc/passwd")"
