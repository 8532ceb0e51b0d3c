#!/usr/bin/env bash
# aside.sh out|back: move what the GPU calls that carry model slices do not need (bench/results/ and the
# shipped bundles' weights, ~33 of the tree's ~37 MB) out of the tree and back, so that a call carries two
# 29 MiB slices within its 64 MiB (bench/README.md, "GPU: how to run"); the kept answers (bench/answers/)
# go to the ignored .answers/, which only the first call carries (`carry`). Commit nothing in between.
set -euo pipefail
A=${ASIDE:-$(dirname "$PWD")/aside}
case ${1:?out or back} in
  out)
    [ ! -e "$A" ] || { echo "$A exists: run 'back' first" >&2; exit 1; }
    mkdir -p "$A" && mv bench/results "$A/results"
    for f in collocate/bundles/*/model.safetensors; do mkdir -p "$A/$(dirname "$f")" && mv "$f" "$A/$f"; done
    mkdir -p .answers && for f in bench/answers/*.tgz; do  # (their names kept: .answers/ may hold others)
      [ -e "$f" ] || continue; mv "$f" .answers/ && basename "$f" >> "$A/answers"; done ;;
  back)
    mv "$A/results" bench/results
    (cd "$A" && find collocate -name model.safetensors) | while read -r f; do mv "$A/$f" "$f"; done
    if [ -f "$A/answers" ]; then while read -r f; do mv ".answers/$f" bench/answers/; done < "$A/answers"; fi
    rm -r "$A" && git status --short ;;
  *) echo "out or back" >&2; exit 2 ;;
esac
