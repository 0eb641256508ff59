#!/usr/bin/env bash
# Builds the book into target/book and fails on what mdBook only logs: an
# include whose file is missing, an include whose anchor is not in its file
# (mdBook includes nothing then), and a link to a chapter or a heading that
# does not exist.
#
#   scripts/check-book.sh
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
fail() {
    echo "book: $*" >&2
    failed=1
}

# The anchors of a heading as mdBook makes them: lower case, punctuation
# dropped, spaces to dashes.
slugs() {
    grep -E '^#{1,6} ' "$1" | sed -E 's/^#+ //' | tr '[:upper:]' '[:lower:]' |
        sed -E 's/`//g; s/[^a-z0-9 _-]//g; s/ /-/g'
}

for page in docs/src/*.md; do
    # {{#include path}} and {{#include path:anchor}}
    while IFS= read -r include; do
        target=${include#\{\{#include }
        target=${target%\}\}}
        path=${target%%:*}
        anchor=""
        [[ $target == *:* ]] && anchor=${target#*:}
        file="docs/src/$path"
        if [[ ! -f $file ]]; then
            fail "$page includes $path, which does not exist"
        elif [[ -n $anchor && ! $anchor =~ ^[0-9] ]] &&
            ! grep -qE "ANCHOR: ${anchor}\$" "$file"; then
            fail "$page includes $path:$anchor, and that file has no such anchor"
        fi
    done < <(grep -oE '\{\{#include [^}]+\}\}' "$page" || true)

    # [text](chapter.md) and [text](chapter.md#heading)
    while IFS= read -r link; do
        link=${link#](}
        link=${link%)}
        chapter=${link%%#*}
        file="docs/src/$chapter"
        if [[ ! -f $file ]]; then
            fail "$page links to $chapter, which does not exist"
        elif [[ $link == *#* ]]; then
            heading=${link#*#}
            slugs "$file" | grep -qxF "$heading" ||
                fail "$page links to $chapter#$heading, which has no such heading"
        fi
    done < <(grep -oE '\]\([a-z0-9_-]+\.md(#[a-z0-9_-]+)?\)' "$page" || true)
done

# Every chapter is in the summary.
for page in docs/src/*.md; do
    name=$(basename "$page")
    [[ $name == SUMMARY.md ]] && continue
    grep -qF "($name)" docs/src/SUMMARY.md || fail "$name is not in SUMMARY.md"
done

log=$(mktemp)
trap 'rm -f "$log"' EXIT
mdbook build docs --dest-dir "$PWD/target/book" >"$log" 2>&1 || {
    cat "$log" >&2
    fail "mdbook build failed"
}
if grep -E '\[(ERROR|WARN)\]' "$log" >&2; then
    fail "mdbook reported the problems above"
fi

if [[ $failed -ne 0 ]]; then
    exit 1
fi
echo "book: built into target/book, every include and link resolves"
