#!/bin/sh
# Checks the contract in the working tree for wire-breaking changes with
# `buf breaking` (rules: buf.yaml), against the point where this branch left main.
#
#   on a branch ahead of main     -> against `git merge-base HEAD main`
#   on main (or no commits ahead) -> against HEAD when protos/ has uncommitted
#                                    changes, otherwise against HEAD~1, so a
#                                    fresh clone of main checks its last change
#   no earlier commit (a shallow or one-commit clone, or no git at all)
#                                 -> nothing to compare with: says so and passes
#
# BUF_BREAKING_AGAINST=<commit> overrides the choice; BUF (default
# node_modules/.bin/buf) names the buf binary; MAIN_BRANCH defaults to main.
set -eu
cd "$(dirname "$0")/.."

BUF="${BUF:-node_modules/.bin/buf}"
MAIN_BRANCH="${MAIN_BRANCH:-main}"

if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
    against="$BUF_BREAKING_AGAINST"
    why="as asked (BUF_BREAKING_AGAINST)"
else
    if ! git rev-parse --verify --quiet HEAD >/dev/null 2>&1; then
        echo "buf breaking: skipped, not in a git checkout with commits: nothing to compare with"
        exit 0
    fi
    head=$(git rev-parse HEAD)
    base=""
    if git rev-parse --verify --quiet "refs/heads/$MAIN_BRANCH" >/dev/null; then
        base=$(git merge-base HEAD "refs/heads/$MAIN_BRANCH" 2>/dev/null || true)
    elif git rev-parse --verify --quiet "refs/remotes/origin/$MAIN_BRANCH" >/dev/null; then
        base=$(git merge-base HEAD "refs/remotes/origin/$MAIN_BRANCH" 2>/dev/null || true)
    fi
    if [ -n "$base" ] && [ "$base" != "$head" ]; then
        against="$base"
        why="where this branch left $MAIN_BRANCH"
    elif ! git diff --quiet HEAD -- protos buf.yaml; then
        against="$head"
        why="HEAD (protos/ has uncommitted changes)"
    elif git rev-parse --verify --quiet "HEAD~1^{commit}" >/dev/null; then
        against=$(git rev-parse "HEAD~1")
        why="HEAD~1 (this is $MAIN_BRANCH or has no commits of its own)"
    else
        echo "buf breaking: skipped, HEAD has no parent in this clone (shallow or first commit): nothing to compare with"
        exit 0
    fi
fi

echo "buf breaking: against $(git rev-parse --short "$against"), $why"
exec "$BUF" breaking --against ".git#ref=$(git rev-parse "$against")"
