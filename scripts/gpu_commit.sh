# Sourced by gpu_prepare.sh (here) and by gpu_session.sh and gpu_sweep.sh (on the device, where no
# .git travels): the commit the run records name, and whether the tree still is that commit.
#   gpu_commit_write  here, after committing: .gpu/COMMIT (with -dirty when src, configs, sweeps,
#                     scripts or pyproject.toml differ from HEAD) and .gpu/SHA256SUMS of those
#                     tracked files;
#   gpu_commit_export there: DYSHUFFLE_COMMIT from .gpu/COMMIT, with -dirty (and a warning on
#                     stderr) when a summed file changed since gpu_prepare.sh, so a tree edited
#                     after preparing, or a stale .gpu/, never names a clean commit.
GPU_COMMIT_PATHS=(src configs sweeps scripts pyproject.toml)

gpu_commit_write() {
  local commit
  commit=$(git rev-parse HEAD)
  if ! git diff --quiet HEAD -- "${GPU_COMMIT_PATHS[@]}"; then
    echo "warning: uncommitted changes in ${GPU_COMMIT_PATHS[*]}: the records will name $commit-dirty" >&2
    commit=$commit-dirty
  fi
  mkdir -p .gpu
  echo "$commit" > .gpu/COMMIT
  git ls-files -z -- "${GPU_COMMIT_PATHS[@]}" | xargs -0 sha256sum > .gpu/SHA256SUMS
}

gpu_commit_export() {
  [ -n "${DYSHUFFLE_COMMIT:-}" ] && { export DYSHUFFLE_COMMIT; return 0; }
  [ -f .gpu/COMMIT ] || return 0
  DYSHUFFLE_COMMIT=$(cat .gpu/COMMIT)
  if [ ! -f .gpu/SHA256SUMS ]; then
    echo "warning: .gpu/SHA256SUMS missing (a .gpu/ from before it): cannot tell whether the tree is $DYSHUFFLE_COMMIT; the records will name $DYSHUFFLE_COMMIT-dirty; run scripts/gpu_prepare.sh again" >&2
    DYSHUFFLE_COMMIT=${DYSHUFFLE_COMMIT%-dirty}-dirty
  elif ! command -v sha256sum >/dev/null; then
    echo "warning: no sha256sum here: cannot tell whether the tree is $DYSHUFFLE_COMMIT (named as it is)" >&2
  elif ! sha256sum --quiet --check .gpu/SHA256SUMS >/dev/null 2>&1; then
    echo "warning: files differ from the commit .gpu/COMMIT names ($DYSHUFFLE_COMMIT); the records will name $DYSHUFFLE_COMMIT-dirty; commit and run scripts/gpu_prepare.sh again" >&2
    DYSHUFFLE_COMMIT=${DYSHUFFLE_COMMIT%-dirty}-dirty
  fi
  export DYSHUFFLE_COMMIT
}
