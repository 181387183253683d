#!/usr/bin/env bash
# Background jobs that outlive one device call (each call may run 10 minutes; a job
# chain may run longer while calls follow each other within the warm window).
#
#   dev/gpu/bg.sh snapshot DIR          copy this working tree to DIR (later calls
#                                         re-sync the tree; jobs run from the copy)
#   dev/gpu/bg.sh start NAME GPUS CMD   run `bash -c CMD` detached, CUDA_VISIBLE_DEVICES=GPUS,
#                                         log $BG/NAME.log, exit status in $BG/NAME.rc
#   dev/gpu/bg.sh wait SECONDS NAME...  until every NAME has finished or SECONDS pass;
#                                         prints each log's tail; exit 0 when all finished
#   dev/gpu/bg.sh status                one line per job
# BG=/tmp/bg by default.
set -uo pipefail
BG="${BG:-/tmp/bg}"
mkdir -p "$BG"
cmd="${1:-}"; shift || true
case "$cmd" in
  snapshot)
    rm -rf "$1"; mkdir -p "$1"
    tar --exclude=./.git --exclude=./.gpu-carry --exclude=./.venv -cf - . | tar -xf - -C "$1"
    echo "working tree copied to $1 ($(du -sh "$1" | cut -f1))" ;;
  start)
    name="$1" gpus="$2"; shift 2
    rm -f "$BG/$name.rc"
    CUDA_VISIBLE_DEVICES="$gpus" setsid nohup bash -c "( $* ); echo \$? > '$BG/$name.rc'" \
      > "$BG/$name.log" 2>&1 < /dev/null &
    echo "$(date +%T) started $name on GPU $gpus (pid $!)" | tee -a "$BG/jobs.txt" ;;
  wait)
    limit="$1"; shift
    t0=$SECONDS
    while :; do
      left=0
      for n in "$@"; do [ -f "$BG/$n.rc" ] || left=$((left + 1)); done
      [ $left -eq 0 ] && break
      [ $((SECONDS - t0)) -ge "$limit" ] && break
      sleep 5
    done
    for n in "$@"; do
      echo "--- $n: $([ -f "$BG/$n.rc" ] && echo "finished rc=$(cat "$BG/$n.rc")" || echo running)"
      tail -n "${TAIL:-12}" "$BG/$n.log" 2>/dev/null
    done
    [ $left -eq 0 ] ;;
  status)
    for f in "$BG"/*.log; do
      n="$(basename "$f" .log)"
      echo "$n: $([ -f "$BG/$n.rc" ] && echo "rc=$(cat "$BG/$n.rc")" || echo running) $(tail -n 1 "$f")"
    done ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
