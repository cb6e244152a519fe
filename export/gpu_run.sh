#!/usr/bin/env bash
# One call on a lent GPU machine (docs/training.md, "Training on a lent GPU"): the carried
# wheels and the packed data (.whl/, .gpu/: python -m rtns_export.remote pack), then every run
# of RUNS concurrently on the one GPU for WALL seconds, then the run folders into $OUT.
#   RUNS: "name:config:KEY=JSON,KEY=JSON ..." entries, separated by spaces
#   WALL: seconds after which every run gets SIGTERM (it validates, checkpoints and stops)
#   a run whose folder is under .gpu/resume/<name> (last.pt, config.json, train.csv,
#   valid.csv of an earlier call) resumes from it; raise its optim.max_minutes in RUNS to
#   give a cosine_time schedule room (the learning rate restarts where t/max_minutes says)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
WALL=${WALL:-420}
WORK=${WORK:-/tmp/rtns-gpu}
mkdir -p "$OUT" "$WORK/configs" "$WORK/pkg"
t0=$(date +%s)
say() { echo "[gpu_run +$(( $(date +%s) - t0 ))s] $*"; }

# SKIP_INSTALL=1: a rehearsal here, in the project's own environment
if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl || exit 1
fi
if [ -z "${SKIP_INSTALL:-}" ] && ls .whl/pesq-*.tar.gz >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$WORK/site" .whl/pesq-*.tar.gz >"$OUT/pesq_build.log" 2>&1 \
        || say "pesq did not build (see pesq_build.log)"
fi
ln -sfn "$PWD/export" "$WORK/pkg/rtns_export"
export PYTHONPATH="$WORK/site:$WORK/pkg:$PWD" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
extra=()
if ! python3 -c "import pesq" 2>/dev/null; then
    say "no PESQ here: runs select their best checkpoint by SI-SDR"
    extra=(--set 'valid.select="si_sdr"' --set 'valid.pesq_items=0')
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || say "no nvidia-smi"
say "setup done"

pids=()
decode=()
for entry in ${RUNS}; do
    IFS=: read -r name config sets <<<"$entry"
    args=()
    IFS=, read -ra kv <<<"${sets:-}"
    for s in "${kv[@]}"; do args+=(--set "$s"); done
    mkdir -p "$WORK/configs/$name"
    python3 -m rtns_export.remote prepare "$config" --data .gpu/data --runs "$WORK/runs" \
        --configs-out "$WORK/configs/$name" --jobs 16 --set "name=\"$name\"" \
        "${args[@]}" "${extra[@]}" "${decode[@]}" >>"$OUT/prepare.log" 2>&1 \
        || { say "prepare $name failed"; continue; }
    decode=(--no-decode)  # the first one filled the audio cache
    if [ -d ".gpu/resume/$name" ]; then
        cp -r ".gpu/resume/$name" "$WORK/runs/" && say "$name resumes from .gpu/resume/$name"
    fi
    cfg="$WORK/configs/$name/$(basename "$config")"
    timeout -s TERM -k 90 "$WALL" python3 -m rtns_export.remote train "$cfg" --threads 1 \
        >"$WORK/$name.log" 2>&1 &
    pids+=($!)
    say "started $name"
done
for p in "${pids[@]}"; do wait "$p"; done
say "all runs ended"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
tail -n 3 "$WORK"/*.log
# back: one archive per run when at most 7 ran, else one per family prefix (at most 8 files
# come back, 16 MiB each); last.pt only for runs whose name matches KEEP_LAST (to resume them
# here), best.pt, snapshots and the logs for all
cd "$WORK" && tar czf "$OUT/logs.tgz" ./*.log configs
names=$(ls runs | grep -v '^cache$')
if [ "$(echo "$names" | wc -l)" -le 7 ]; then groups=$names; else groups=$(echo "$names" | cut -d_ -f1 | sort -u); fi
for group in $groups; do
    files=()
    for d in runs/"$group" runs/"$group"_*; do
        [ -d "$d" ] || continue
        for f in "$d"/*; do
            case "$f" in
                *.tmp) ;;
                */last.pt) [[ "$d" == *${KEEP_LAST:-gpu}* ]] && files+=("$f") ;;
                *) files+=("$f") ;;
            esac
        done
    done
    tar czf "$OUT/runs_$group.tgz" "${files[@]}"
done
say "packed: $(cd "$OUT" && du -h ./*.tgz | tr '\n' ' ')"
