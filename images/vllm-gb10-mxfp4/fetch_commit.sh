#!/bin/sh
# fetch_commit.sh REPO COMMIT DIR: check out exactly COMMIT of REPO into DIR (shallow),
# retrying a flaky network three times before failing the build.
set -eu
repo=$1 commit=$2 dir=$3
for attempt in 1 2 3; do
    rm -rf "$dir"
    if git init -q "$dir" \
        && git -C "$dir" remote add origin "$repo" \
        && git -C "$dir" fetch -q --depth 1 origin "$commit" \
        && git -C "$dir" checkout -q FETCH_HEAD; then
        echo "$repo at $commit"
        exit 0
    fi
    echo "fetching $repo failed (attempt $attempt of 3)" >&2
    sleep $((attempt * 10))
done
exit 1
